"""Attention-head removal and MLP-width pruning for torchvision ViT and Swin.

The strongest check is an equivalence: a head-pruned model must equal the ORIGINAL model in
which the dropped heads' out-projection columns are zeroed, which proves both that the
replacement attention reproduces torchvision's and that the kept heads are the right ones.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torchvision.models import VisionTransformer, swin_transformer

from prunetune.spaces.heads import (
    PrunedMultiheadAttention,
    PrunedShiftedWindowAttention,
    find_attention,
    head_importance,
    prune_heads,
    prune_mlp,
    pruned_attention,
)

TOL = 1e-5


def make_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                              hidden_dim=32, mlp_dim=64, num_classes=10)
    # torchvision zero-initialises the classifier; without this every output would be 0
    nn.init.normal_(model.heads.head.weight)
    return model.eval()


def make_swin(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10).eval()


MODELS = {"vit": (make_vit, 32), "swin": (make_swin, 64)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images(resolution: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))


def out_weight(module: nn.Module) -> torch.Tensor:
    return module.out_proj.weight if hasattr(module, "out_proj") else module.proj.weight


def zero_heads(model: nn.Module, dropped: dict[str, list[int]]) -> nn.Module:
    """The model itself with the out-projection columns of the `dropped` heads set to zero."""
    with torch.no_grad():
        for name, heads in dropped.items():
            module = model.get_submodule(name)
            head_dim = out_weight(module).shape[1] // module.num_heads
            for h in heads:
                out_weight(module)[:, h * head_dim:(h + 1) * head_dim] = 0
    return model


def scale_heads(module: nn.Module, factors: list[float]) -> None:
    """Multiply each head's q/k/v rows and out-projection columns by its factor."""
    w_in = module.in_proj_weight if hasattr(module, "in_proj_weight") else module.qkv.weight
    w_out = out_weight(module)
    head_dim = w_out.shape[1] // module.num_heads
    with torch.no_grad():
        for h, f in enumerate(factors):
            for part in range(3):
                start = part * w_out.shape[1] + h * head_dim
                w_in[start:start + head_dim] *= f
            w_out[:, h * head_dim:(h + 1) * head_dim] *= f


@pytest.mark.parametrize("arch", list(MODELS))
def test_find_attention_lists_every_attention_module(arch):
    make, _ = MODELS[arch]
    expected = ({f"encoder.layers.encoder_layer_{i}.self_attention": 4 for i in range(2)}
                if arch == "vit" else
                {"features.1.0.attn": 2, "features.1.1.attn": 2, "features.3.0.attn": 4,
                 "features.3.1.attn": 4})
    assert find_attention(make()) == expected


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("arch", list(MODELS))
def test_keeping_every_head_reproduces_the_original(arch, resolution):
    model = MODELS[arch][0]()
    pruned = prune_heads(model, 1.0)
    for name in find_attention(model):
        assert isinstance(pruned.get_submodule(name),
                          (PrunedMultiheadAttention, PrunedShiftedWindowAttention))
    x = images(resolution if arch == "swin" else 32)
    with torch.no_grad():
        ref = model(x)
        assert ref.abs().max() > 1e-3  # the comparison below is not between zeros
        assert (pruned(x) - ref).abs().max() <= TOL


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (4, 4)], ids=["whole-windows", "padded", "one-window"])
def test_window_attention_port_matches_torchvision(shift, size):
    """Module level, so padding and the shift mask are exercised at sizes the models skip."""
    torch.manual_seed(0)
    attn = swin_transformer.ShiftedWindowAttention(24, [4, 4], [shift, shift], num_heads=3).eval()
    nn.init.normal_(attn.relative_position_bias_table)
    x = torch.randn(2, *size, 24)
    with torch.no_grad():
        assert (pruned_attention(attn, [0, 1, 2])(x) - attn(x)).abs().max() <= TOL


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_replacement_returns_the_same_attention_weights(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    new = pruned_attention(mha, range(4))
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    with torch.no_grad():
        for average in (True, False):
            out, w = mha(x, x, x, need_weights=True, average_attn_weights=average)
            out2, w2 = new(x, x, x, need_weights=True, average_attn_weights=average)
            assert (out2 - out).abs().max() <= TOL and (w2 - w).abs().max() <= TOL
        out3, none = new(x, x, x, need_weights=False)
        assert none is None and (out3 - out).abs().max() <= TOL


@pytest.mark.parametrize("arch", list(MODELS))
def test_halving_heads_shrinks_the_attention(arch):
    make, resolution = MODELS[arch]
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_heads(model, 0.5)
    found = find_attention(model)
    assert find_attention(pruned) == {name: n // 2 for name, n in found.items()}
    for name, n in found.items():
        old, new = model.get_submodule(name), pruned.get_submodule(name)
        assert out_weight(new).shape[1] == out_weight(old).shape[1] // 2
        assert out_weight(new).shape[0] == out_weight(old).shape[0]  # residual width untouched
        if arch == "vit":
            assert new.q_proj.weight.shape[0] == old.in_proj_weight.shape[0] // 6
            assert pruned.get_submodule(name.rpartition(".")[0]).num_heads == n // 2
        else:
            assert new.qkv.weight.shape[0] == old.qkv.weight.shape[0] // 2
            assert new.relative_position_bias_table.shape[1] == n // 2
    assert n_params(pruned) < n_params(model)
    with torch.no_grad():
        assert pruned(images(resolution)).shape == (2, 10)
    assert find_attention(model) == found
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", list(MODELS))
def test_pruned_model_equals_original_with_dropped_heads_zeroed(arch):
    make, resolution = MODELS[arch]
    model = make()
    pruned = prune_heads(model, 0.5)
    dropped = {}
    for name, n in find_attention(model).items():
        order = torch.argsort(head_importance(model.get_submodule(name)), descending=True)
        dropped[name] = order[n // 2:].tolist()
    x = images(resolution)
    with torch.no_grad():
        got = pruned(x)
        reference = zero_heads(model, dropped)(x)
    assert (got - reference).abs().max() <= TOL


@pytest.mark.parametrize("arch", list(MODELS))
def test_importance_ranks_heads_by_weight_norm(arch):
    make, resolution = MODELS[arch]
    model = make()
    name = "encoder.layers.encoder_layer_0.self_attention" if arch == "vit" else "features.3.1.attn"
    module = model.get_submodule(name)
    plain = head_importance(module)
    factors = [0.1, 10.0, 0.01, 5.0]  # heads 1 and 3 must survive a halving
    scale_heads(module, factors)
    assert torch.allclose(head_importance(module), plain * torch.tensor(factors), rtol=1e-4)
    assert torch.argsort(head_importance(module), descending=True)[:2].tolist() == [1, 3]

    pruned = prune_heads(model, {name: 2})
    x = images(resolution)
    with torch.no_grad():
        assert (pruned(x) - zero_heads(model, {name: [0, 2]})(x)).abs().max() <= TOL


def test_dict_keep_replaces_only_the_named_modules():
    model = make_vit()
    pruned = prune_heads(model, {"encoder.layers.encoder_layer_1.self_attention": 1})
    assert find_attention(pruned) == {"encoder.layers.encoder_layer_0.self_attention": 4,
                                      "encoder.layers.encoder_layer_1.self_attention": 1}
    assert isinstance(pruned.encoder.layers[0].self_attention, nn.MultiheadAttention)
    # a pruned model can be pruned again
    again = prune_heads(pruned, 0.5)
    assert set(find_attention(again).values()) == {2, 1}


@pytest.mark.parametrize("keep, error, match", [
    ({"encoder.layers.encoder_layer_0.self_attention": 0}, ValueError, "encoder_layer_0.self_attention"),
    ({"encoder.layers.encoder_layer_1.self_attention": 5}, ValueError, "encoder_layer_1.self_attention"),
    ({"encoder.layers.encoder_layer_0.self_attention": 1.5}, ValueError, "encoder_layer_0.self_attention"),
    ({"encoder.layers.encoder_layer_0.mlp": 1}, KeyError, "encoder_layer_0.mlp"),
    (0.0, ValueError, "keep"),
    (1.5, ValueError, "keep"),
])
def test_invalid_keep_names_the_offender(keep, error, match):
    with pytest.raises(error, match=match):
        prune_heads(make_vit(), keep)


def test_unsupported_attention_variants_are_named():
    v2 = swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=[2], num_heads=[2], window_size=[4, 4],
        block=swin_transformer.SwinTransformerBlockV2)
    with pytest.raises(TypeError, match=r"features\.1\.0\.attn.*v2"):
        find_attention(v2)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, add_zero_attn=True))
    with pytest.raises(TypeError, match="0: .*add_zero_attn"):
        prune_heads(model, 0.5)


def test_masks_are_refused_not_ignored():
    attn = pruned_attention(nn.MultiheadAttention(8, 2, batch_first=True), [0])
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x, x, x, attn_mask=torch.zeros(3, 3))


def test_torchscript_of_head_pruned_vit():
    pruned = prune_heads(make_vit(), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in 2.14
        scripted = torch.jit.script(pruned)
    x = images(32)
    with torch.no_grad():
        assert (scripted(x) - pruned(x)).abs().max() <= 1e-4


def test_onnx_export_of_head_pruned_vit(tmp_path):
    pruned = prune_heads(make_vit(), 0.5)
    x = images(32)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(pruned, (x,), dynamo=True, verbose=False).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert np.abs(got - pruned(x).numpy()).max() <= 1e-4


def mlp_linears(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    return [(m[0], m[3]) for m in model.modules() if type(m).__name__ in ("MLP", "MLPBlock")]


@pytest.mark.parametrize("heads_first", [False, True], ids=["mlp", "heads+mlp"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_prune_mlp_halves_hidden_width_and_drops_weakest_units(arch, heads_first):
    make, resolution = MODELS[arch]
    model = make()
    with torch.no_grad():
        for fc1, _ in mlp_linears(model):
            fc1.weight[::2] *= 0.01  # even hidden units are the weakest
    if heads_first:
        model = prune_heads(model, 0.5)
    x = images(resolution)
    pruned = prune_mlp(model, 0.5, x)

    widths = [(fc1.out_features, fc2.in_features) for fc1, fc2 in mlp_linears(model)]
    assert [(fc1.out_features, fc2.in_features) for fc1, fc2 in mlp_linears(pruned)] == [
        (a // 2, b // 2) for a, b in widths]
    mlp_params = {n for n, _ in pruned.named_parameters() if ".mlp." in n}
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert all(p.shape == shapes[n] for n, p in pruned.named_parameters() if n not in mlp_params)
    with torch.no_grad():
        for _, fc2 in mlp_linears(model):
            fc2.weight[:, ::2] = 0
        assert (pruned(x) - model(x)).abs().max() <= TOL


def test_prune_mlp_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        prune_mlp(make_vit(), 0.0, images(32))
