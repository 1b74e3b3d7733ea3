"""Importance criteria: every registered one works; magnitude/BN criteria keep the right channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunetune.spaces import IMPORTANCES, PruningVector, describe, kept_channels, prune, register_importance
from prunetune.spaces.importance import get_importance

X = torch.zeros(1, 1, 16, 16)
VECTOR = PruningVector(channels={"layer1": 0.5, "layer2": 0.25, "layer3": 0.75}, depth={"layer3": 2})


def kept_rows(parent_w: torch.Tensor, sub_w: torch.Tensor) -> list[int]:
    """Indices of the parent's output channels that survive in `sub_w` (exact match)."""
    flat_p, flat_s = parent_w.flatten(1), sub_w.flatten(1)
    idx = []
    for row in flat_s:
        hits = [i for i, p in enumerate(flat_p) if torch.equal(p, row)]
        assert len(hits) == 1, "a kept channel must be exactly one of the parent's channels"
        idx.append(hits[0])
    return idx


def kept_values(parent_v: torch.Tensor, sub_v: torch.Tensor) -> list[int]:
    """Indices of `sub_v`'s entries in `parent_v` (entries are distinct)."""
    return [int((parent_v == v).nonzero().item()) for v in sub_v]


def distinct_bn(model: nn.Module) -> nn.Module:
    """Distinct BN parameters and buffers everywhere, so each kept channel can be traced back."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def test_registry_has_the_documented_criteria():
    assert {"l1", "l2", "bn_scale", "random"} <= set(IMPORTANCES)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_registered_importance_prunes_consistently(make_model, importance):
    """Each BN keeps a sorted subset of its channels; every conv's weight is the parent's
    restricted to the channels its output BN and its input BN kept; a stage's residual
    stream keeps one channel set in all its producers."""
    parent = distinct_bn(make_model("cifar:resnet20")).eval()
    structure = describe(parent, X)
    sub = prune(parent, VECTOR, X, structure=structure, importance=importance).module
    P = dict(parent.named_modules())
    S = dict(sub.named_modules())

    def idx(bn: str) -> list[int]:
        i = kept_values(P[bn].weight, S[bn].weight)
        assert i == sorted(i), f"{bn}: kept channels must stay in the parent's order"
        for attr in ("bias", "running_mean", "running_var"):
            assert torch.equal(getattr(S[bn], attr), getattr(P[bn], attr)[i]), (bn, attr)
        return i

    def check_conv(conv: str, out_bn: str, in_idx: list[int]) -> list[int]:
        out = idx(out_bn)
        assert torch.equal(S[conv].weight, P[conv].weight[out][:, in_idx]), conv
        return out

    stream = check_conv("conv1", "bn1", [0])
    for k, stage in enumerate(("layer1", "layer2", "layer3")):
        ratio = VECTOR.channels[stage]
        prev, size = stream, 16 * 2 ** k
        if k:
            stream = check_conv(f"{stage}.0.downsample.0", f"{stage}.0.downsample.1", prev)
        assert len(stream) == kept_channels(size, ratio)
        for i in range(3):
            block = f"{stage}.{i}"
            if isinstance(S[block], nn.Identity):
                continue
            inner = check_conv(f"{block}.conv1", f"{block}.bn1", prev if i == 0 else stream)
            assert len(inner) == kept_channels(size, ratio)
            assert check_conv(f"{block}.conv2", f"{block}.bn2", inner) == stream  # coupled
    assert torch.equal(sub.fc.weight, parent.fc.weight[:, stream])
    with torch.no_grad():
        assert sub(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def heavy_tailed(seed: int = 5) -> torch.Tensor:
    # Heavy-tailed rows so that the L1 and L2 orders differ.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 16, 3, 3, generator=g) * torch.rand(16, 16, 3, 3, generator=g) ** 4


def _controlled_block(model, conv_w: torch.Tensor | None = None, gamma: torch.Tensor | None = None):
    """Make the scores of the group rooted at layer1.1.conv1 depend only on conv1's weights (or
    only on bn1's gamma): bn1's gamma is constant (or given), and conv2's input slices all have
    the same norm over any set of its rows (each row permutes one kernel), while staying
    distinguishable, so that the test can see they follow conv1's channels."""
    block = model.layer1[1]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        if conv_w is not None:
            block.conv1.weight.copy_(conv_w)
        block.bn1.weight.copy_(gamma if gamma is not None else torch.ones(16))
        block.bn1.bias.zero_()
        block.bn1.running_mean.copy_(torch.randn(16, generator=g))
        block.bn1.running_var.copy_(torch.rand(16, generator=g) + 0.5)
        base = torch.randn(16, 9, generator=g)  # one kernel per output row of conv2
        for c in range(16):
            kernel = base.roll(c % 9, dims=1)
            block.conv2.weight[:, c] = (kernel.flip(1) if c >= 9 else kernel).view(16, 3, 3)
    return block


def residual_kept(parent, sub) -> list[int]:
    """Channels of layer1's residual stream kept (the stem conv reads the unpruned image)."""
    return kept_rows(parent.conv1.weight, sub.conv1.weight)


def top_k(w: torch.Tensor, p: int, k: int) -> list[int]:
    return sorted(torch.argsort(w.flatten(1).norm(p=p, dim=1), descending=True)[:k].tolist())


@pytest.mark.parametrize(("importance", "p"), [("l1", 1), ("l2", 2)])
def test_magnitude_keeps_the_highest_norm_channels(make_model, importance, p):
    parent = make_model("cifar:resnet20").eval()
    w = heavy_tailed()
    block = _controlled_block(parent, conv_w=w)
    k = 5
    sub = prune(parent, PruningVector(channels={"layer1": k / 16}), X, importance=importance).module
    # The stage's residual stream is pruned first, so conv1 is scored on its kept inputs.
    res = residual_kept(parent, sub)
    assert len(res) == k
    top = top_k(w[:, res], p, k)
    assert top != top_k(w[:, res], 3 - p, k), "the weights must tell L1 from L2 apart"

    kept = sub.layer1[1]
    assert kept.conv1.out_channels == k
    assert torch.equal(kept.conv1.weight, block.conv1.weight[top][:, res])
    # BN and the next conv's input follow the same channels.
    assert torch.equal(kept.bn1.weight, block.bn1.weight[top])
    assert torch.equal(kept.bn1.running_mean, block.bn1.running_mean[top])
    assert torch.equal(kept.bn1.running_var, block.bn1.running_var[top])
    assert torch.equal(kept.conv2.weight, block.conv2.weight[res][:, top])


def test_bn_scale_keeps_the_largest_gammas(make_model):
    parent = make_model("cifar:resnet20").eval()
    gamma = torch.tensor([0.3, -2.0, 0.1, 1.5, 0.7, -0.05, 0.9, 1.1,
                          0.2, 0.6, -1.2, 0.4, 0.8, 0.15, 1.9, 0.5])
    block = _controlled_block(parent, gamma=gamma)
    top = sorted(torch.argsort(gamma.abs(), descending=True)[:4].tolist())
    sub = prune(parent, PruningVector(channels={"layer1": 0.25}), X, importance="bn_scale").module
    res = residual_kept(parent, sub)
    assert torch.equal(sub.layer1[1].bn1.weight, gamma[top])
    assert torch.equal(sub.layer1[1].conv1.weight, block.conv1.weight[top][:, res])
    assert torch.equal(sub.layer1[1].conv2.weight, block.conv2.weight[res][:, top])


def _kept_signature(module):
    return torch.cat([module.get_submodule(n).weight.flatten()
                      for n in ("conv1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
                                "layer3.2.conv1", "fc")])


def test_random_is_deterministic_per_seed_and_varies_across_seeds(make_model):
    parent = make_model("cifar:resnet20")
    structure = describe(parent, X)
    vec = PruningVector(channels={"layer1": 0.5, "layer2": 0.5, "layer3": 0.5})
    run = lambda seed: _kept_signature(prune(  # noqa: E731
        parent, vec, X, structure=structure, importance="random", seed=seed).module)
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert a.shape == c.shape and not torch.equal(a, c)


def test_prune_does_not_disturb_the_global_rng(make_model):
    parent = make_model("cifar:resnet20")
    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    prune(parent, PruningVector(channels={"layer1": 0.5}), X, importance="random", seed=3)
    assert torch.equal(torch.rand(4), expected)


def test_get_importance_unknown_name_lists_known():
    with pytest.raises(KeyError, match="l2"):
        get_importance("no-such-criterion")


def test_registered_criterion_is_usable_by_name(make_model):
    import torch_pruning as tp

    name = "_test_first_layer_l1"
    try:
        register_importance(name)(
            lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="first"))
        sub = prune(make_model("cifar:resnet20"), PruningVector(channels={"layer1": 0.5}), X,
                    importance=name)
        assert sub.module.layer1[0].conv1.out_channels == 8
        assert sub.spec.importance == name
    finally:
        IMPORTANCES.pop(name, None)
