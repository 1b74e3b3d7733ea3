"""find_residual_blocks / group_stages / bypass on real torchvision and prunetune models.

The expected blocks come from each model's own bookkeeping (use_res_connect, proj, layer
sizes), never from the detector, which only looks at the autograd graph.
"""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from prunetune.spaces.blocks import (
    ResidualBlock, StageInfo, bypass, bypassed, find_residual_blocks, group_stages,
)
from prunetune.spaces.common import state_hash
from prunetune.trainers.models import build_model


def _res_connect(model):
    return [n for n, m in model.named_modules() if getattr(m, "use_res_connect", False)]


def _regnet_without_proj(model):
    return [n for n, m in model.named_modules() if hasattr(m, "proj") and m.proj is None]


# name: (factory, resolution, in_channels, expected names from the model or a list, count)
MODELS = {
    "resnet18": (lambda: tvm.resnet18(num_classes=10), 32, 3,
                 ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"], 5),
    "resnet50": (lambda: tvm.resnet50(num_classes=10), 32, 3,
                 [f"layer{s}.{i}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for i in range(1, n)],
                 12),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=10), 32, 3, _res_connect, 10),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(num_classes=10), 32, 3, _res_connect, 6),
    "efficientnet_b0": (lambda: tvm.efficientnet_b0(num_classes=10), 32, 3, _res_connect, 9),
    "regnet_x_400mf": (lambda: tvm.regnet_x_400mf(num_classes=10), 32, 3, _regnet_without_proj, 18),
    "convnext_tiny": (lambda: tvm.convnext_tiny(num_classes=10), 32, 3,
                      [f"features.{s}.{i}" for s, n in zip((1, 3, 5, 7), (3, 3, 9, 3))
                       for i in range(n)], 18),
    "vit": (lambda: tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2,
                                          hidden_dim=32, mlp_dim=64, num_classes=10), 32, 3,
            [f"encoder.layers.encoder_layer_{i}" for i in range(3)], 3),
    "swin": (lambda: SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2],
                                     num_heads=[2, 4], window_size=[4, 4], num_classes=10), 64, 3,
             ["features.1.0", "features.1.1", "features.3.0", "features.3.1"], 4),
    "cifar_resnet20": (lambda: build_model("cifar:resnet20", in_channels=1, num_classes=10), 16, 1,
                       ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2",
                        "layer3.1", "layer3.2"], 7),
    "vgg11_bn": (lambda: tvm.vgg11_bn(num_classes=10), 32, 3, [], 0),
    "squeezenet1_0": (lambda: tvm.squeezenet1_0(num_classes=10), 32, 3, [], 0),
    "googlenet": (lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=True),
                  32, 3, [], 0),
    "shufflenet_v2_x1_0": (lambda: tvm.shufflenet_v2_x1_0(num_classes=10), 32, 3, [], 0),
    "densenet121": (lambda: tvm.densenet121(num_classes=10), 32, 3, [], 0),
}
WITH_BLOCKS = [k for k, v in MODELS.items() if v[4] > 0]


@pytest.fixture(scope="module")
def traced():
    """`traced(name) -> (model, input, blocks)`, built and traced once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            factory, res, in_ch, _, _ = MODELS[name]
            torch.manual_seed(0)
            model = factory()
            x = torch.randn(1, in_ch, res, res)
            cache[name] = (model, x, find_residual_blocks(model, x))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_finds_exactly_the_removable_blocks(traced, name):
    model, _, blocks = traced(name)
    expected, count = MODELS[name][3], MODELS[name][4]
    expected = expected(model) if callable(expected) else expected
    assert len(expected) == count  # guards the ground truth itself
    assert [b.name for b in blocks] == expected


@pytest.mark.parametrize("name", WITH_BLOCKS)
def test_stage_and_index_point_at_the_block(traced, name):
    model, _, blocks = traced(name)
    for b in blocks:
        assert isinstance(b, ResidualBlock)
        assert b.name == f"{b.stage}.{list(dict(model.get_submodule(b.stage).named_children()))[b.index]}"


@pytest.mark.parametrize("name", WITH_BLOCKS)
def test_bypassing_every_droppable_block_keeps_the_output_shape(traced, name):
    model, x, blocks = traced(name)
    stages = group_stages(model, blocks)
    drop = [n for s in stages for n in s.removable[len(s.removable) - s.max_drop:]]
    assert drop
    before = state_hash(model)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        small = bypass(model, drop)
        out = small(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert all(isinstance(small.get_submodule(n), nn.Identity) for n in drop)
    assert not any(isinstance(model.get_submodule(n), nn.Identity) for n in drop)
    assert state_hash(model) == before


def test_stages_of_mobilenet_v2_keep_their_non_block_children(traced):
    model, _, blocks = traced("mobilenet_v2")
    (stage,) = group_stages(model, blocks)
    assert isinstance(stage, StageInfo)
    assert stage.name == "features"
    assert stage.children == tuple(f"features.{i}" for i in range(19))
    assert len(stage.removable) == 10
    assert stage.min_depth == 9 and stage.max_drop == 10


def test_stages_of_resnet20(traced):
    model, _, blocks = traced("cifar_resnet20")
    stages = {s.name: s for s in group_stages(model, blocks)}
    assert list(stages) == ["layer1", "layer2", "layer3"]
    # All three blocks of layer1 are removable, but one must stay.
    assert stages["layer1"].min_depth == 1 and stages["layer1"].max_drop == 2
    assert stages["layer2"].removable == ("layer2.1", "layer2.2")
    assert stages["layer2"].min_depth == 1 and stages["layer2"].max_drop == 2


class Residual(nn.Module):
    def __init__(self, c: int = 4, *, proj: bool = False, act: bool = False):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.proj = nn.Conv2d(c, c, 1) if proj else None
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        skip = x if self.proj is None else self.proj(x)
        return self.act(skip + self.f(x))


class TwoAdds(nn.Module):
    """ViT-style: x = x + f(x); return x + g(x)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.f, self.g = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = x + self.f(x)
        return x + self.g(x)


class AddBias(nn.Module):
    """x + constant: the added branch never reads x, so this is no residual block."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x + self.bias


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Residual()

    def forward(self, x):
        return self.inner(x)


class Attributes(nn.Module):
    """Blocks as plain attributes and inside a ModuleList, around non-block layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = Residual(act=True)
        self.b = Residual(proj=True)
        self.more = nn.ModuleList([TwoAdds(), nn.ReLU(), AddBias(), Wrapper()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.b(self.a(self.stem(x)))
        for m in self.more:
            x = m(x)
        return self.head(x.mean((2, 3)))


def test_toy_blocks_attribute_and_modulelist_children():
    model = Attributes()
    blocks = find_residual_blocks(model, torch.randn(1, 1, 8, 8))
    assert blocks == [
        ResidualBlock("a", "", 1),            # ReLU on top of the sum is fine
        ResidualBlock("more.0", "more", 0),   # nested additions
        ResidualBlock("more.3.inner", "more.3", 0),  # innermost of wrapper + single child
    ]
    small = bypass(model, ["a", "more.0", "more.3.inner"])
    assert isinstance(small.a, nn.Identity) and isinstance(small.more[0], nn.Identity)
    assert isinstance(small.more[3].inner, nn.Identity) and isinstance(model.a, Residual)
    assert small(torch.randn(1, 1, 8, 8)).shape == (1, 2)


def test_model_state_is_restored_and_nothing_updated():
    model = build_model("cifar:resnet20", in_channels=1, num_classes=10)
    model.train()
    model.layer2.eval()
    model.layer1[0].conv1.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    before = state_hash(model)
    find_residual_blocks(model, torch.randn(1, 1, 16, 16))
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert state_hash(model) == before  # BN running statistics untouched
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    model = build_model("cifar:resnet8", in_channels=1, num_classes=10)
    with context():
        x = torch.randn(1, 1, 16, 16)
        names = [b.name for b in find_residual_blocks(model, x)]
    assert names == ["layer1.0"]


def test_bypass_rejects_unknown_or_empty_names():
    model = Attributes()
    with pytest.raises(ValueError, match="more.9"):
        bypass(model, ["more.9"])
    with pytest.raises(ValueError, match="whole model"):
        bypass(model, [""])


def test_bypassed_restores_the_original_modules_even_on_error():
    model = Attributes()
    a, inner = model.a, model.more[3].inner
    with pytest.raises(RuntimeError):
        with bypassed(model, ["a", "more.3.inner"]) as m:
            assert isinstance(m.a, nn.Identity) and isinstance(m.more[3].inner, nn.Identity)
            raise RuntimeError
    assert model.a is a and model.more[3].inner is inner


def test_group_stages_rejects_a_block_outside_its_stage():
    model = Attributes()
    with pytest.raises(ValueError, match="more.3.inner"):
        group_stages(model, [ResidualBlock("more.3.inner", "more", 3)])
