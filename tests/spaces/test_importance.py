"""Importance criteria: every registered one works; magnitude/BN criteria keep the right channels."""

from __future__ import annotations

import pytest
import torch

from prunetune.spaces import IMPORTANCES, PruningVector, discover, materialize, register_importance
from prunetune.spaces.importance import get_importance
from prunetune.spaces.materialize import kept_channels

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


def test_registry_has_the_documented_criteria():
    assert {"l1", "l2", "bn_scale", "random"} <= set(IMPORTANCES)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_every_registered_importance_materializes(make_model, importance):
    parent = make_model("cifar:resnet20")
    space = discover(parent)
    sub = materialize(parent, VECTOR, in_channels=1, native_resolution=16, importance=importance)
    removed = set(sub.spec.removed_blocks)
    for stage in space.stages:
        ratio = VECTOR.channels[stage.name]
        for block, convs in zip(stage.blocks, stage.internal_convs):
            if block in removed:
                continue
            for conv in convs:
                p, s = parent.get_submodule(conv), sub.module.get_submodule(conv)
                assert s.out_channels == kept_channels(p.out_channels, ratio)
                # Kept channels are a subset of the parent's, in the parent's order.
                idx = kept_rows(p.weight, s.weight)
                assert idx == sorted(idx)
    with torch.no_grad():
        assert sub.module(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def _controlled_block(model, conv_w: torch.Tensor | None = None, gamma: torch.Tensor | None = None):
    """Make layer1.0's group scores depend only on conv1's weights (or only on bn1's gamma)."""
    block = model.layer1[0]
    with torch.no_grad():
        if conv_w is not None:
            block.conv1.weight.copy_(conv_w)
        block.bn1.weight.copy_(gamma if gamma is not None else torch.ones(16))
        block.bn1.bias.zero_()
        # conv2's input slices all get the same norm, so they do not reorder channels.
        block.conv2.weight.fill_(0.05)
    return block


@pytest.mark.parametrize(("importance", "p"), [("l1", 1), ("l2", 2)])
def test_magnitude_keeps_the_highest_norm_channels(make_model, importance, p):
    parent = make_model("cifar:resnet8")
    g = torch.Generator().manual_seed(7)
    # Heavy-tailed rows so that the L1 and L2 orders differ.
    w = torch.randn(16, 16, 3, 3, generator=g) * torch.rand(16, 16, 3, 3, generator=g) ** 4
    block = _controlled_block(parent, conv_w=w)
    norms = w.flatten(1).norm(p=p, dim=1)
    k = 5
    top = sorted(torch.argsort(norms, descending=True)[:k].tolist())

    sub = materialize(parent, PruningVector(channels={"layer1": k / 16}), in_channels=1,
                      native_resolution=16, importance=importance)
    kept = sub.module.layer1[0]
    assert kept.conv1.out_channels == k
    assert torch.equal(kept.conv1.weight, block.conv1.weight[top])
    # BN and the next conv's input follow the same channels.
    assert torch.equal(kept.bn1.weight, block.bn1.weight[top])
    assert torch.equal(kept.bn1.running_var, block.bn1.running_var[top])
    assert torch.equal(kept.conv2.weight, block.conv2.weight[:, top])


def test_l1_and_l2_can_disagree_on_the_same_weights():
    # Guards the test above: the constructed case really distinguishes the two norms.
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 16, 3, 3, generator=g) * torch.rand(16, 16, 3, 3, generator=g) ** 4
    top = {p: set(torch.argsort(w.flatten(1).norm(p=p, dim=1), descending=True)[:5].tolist())
           for p in (1, 2)}
    assert top[1] != top[2]


def test_bn_scale_keeps_the_largest_gammas(make_model):
    parent = make_model("cifar:resnet8")
    gamma = torch.tensor([0.3, -2.0, 0.1, 1.5, 0.7, -0.05, 0.9, 1.1,
                          0.2, 0.6, -1.2, 0.4, 0.8, 0.15, 1.9, 0.5])
    block = _controlled_block(parent, gamma=gamma)
    top = sorted(torch.argsort(gamma.abs(), descending=True)[:4].tolist())
    sub = materialize(parent, PruningVector(channels={"layer1": 0.25}), in_channels=1,
                      native_resolution=16, importance="bn_scale")
    assert torch.equal(sub.module.layer1[0].bn1.weight, gamma[top])
    assert torch.equal(sub.module.layer1[0].conv1.weight, block.conv1.weight[top])


def _kept_signature(sub):
    return torch.cat([sub.module.get_submodule(n).weight.flatten()
                      for n in ("layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer3.2.conv1")])


def test_random_is_deterministic_per_seed_and_varies_across_seeds(make_model):
    parent = make_model("cifar:resnet20")
    vec = PruningVector(channels={"layer1": 0.5, "layer2": 0.5, "layer3": 0.5})
    run = lambda seed: _kept_signature(materialize(  # noqa: E731
        parent, vec, in_channels=1, native_resolution=16, importance="random", seed=seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert a.shape == c.shape and not torch.equal(a, c)


def test_materialize_does_not_disturb_the_global_rng(make_model):
    parent = make_model("cifar:resnet8")
    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    materialize(parent, PruningVector(channels={"layer1": 0.5}), in_channels=1,
                native_resolution=16, importance="random", seed=3)
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
        sub = materialize(make_model("cifar:resnet8"), PruningVector(channels={"layer1": 0.5}),
                          in_channels=1, native_resolution=16, importance=name)
        assert sub.module.layer1[0].conv1.out_channels == 8
    finally:
        IMPORTANCES.pop(name, None)
