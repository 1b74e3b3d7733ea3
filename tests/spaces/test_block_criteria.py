"""Block criteria: every registered one scores every block; data-driven ones find a no-op block."""

from __future__ import annotations

import math

import pytest
import torch

from prunetune.spaces.block_criteria import (
    BLOCK_CRITERIA, choose_blocks_to_drop, get_block_criterion, linear_cka,
    register_block_criterion,
)
from prunetune.spaces.blocks import find_residual_blocks
from prunetune.spaces.common import state_hash

DATA_DRIVEN = sorted(n for n, c in BLOCK_CRITERIA.items() if c.needs_probes)
NO_OP = "layer2.1"  # a middle block, so "position" alone would not pick it


@pytest.fixture
def resnet20(make_model):
    model = make_model("cifar:resnet20")
    blocks = [b.name for b in find_residual_blocks(model, torch.zeros(1, 1, 16, 16))]
    return model, blocks


@pytest.fixture
def probes():
    return torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def make_no_op(model, name: str = NO_OP) -> None:
    """Zero the block's last BN (CURL-style): relu(0 + x) = x for the post-ReLU input x."""
    with torch.no_grad():
        model.get_submodule(f"{name}.bn2").weight.zero_()
        model.get_submodule(f"{name}.bn2").bias.zero_()


def test_registry_has_the_documented_criteria():
    assert {"position", "weight_norm", "kl", "cka"} <= set(BLOCK_CRITERIA)
    assert {"kl", "cka"} <= set(DATA_DRIVEN)


@pytest.mark.parametrize("criterion", sorted(BLOCK_CRITERIA))
def test_one_finite_deterministic_score_per_block(resnet20, probes, criterion):
    model, blocks = resnet20
    model.train()
    before = state_hash(model)
    crit = get_block_criterion(criterion)
    first = crit(model, blocks, probes=probes)
    again = crit(model, blocks, probes=probes)
    assert list(first) == blocks
    assert all(isinstance(v, float) and math.isfinite(v) for v in first.values())
    assert first == again
    # The model comes back as it was: same weights and statistics, same mode.
    assert state_hash(model) == before
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("criterion", sorted(BLOCK_CRITERIA))
def test_choose_returns_distinct_blocks_lowest_score_first(resnet20, probes, criterion):
    model, blocks = resnet20
    stage = [b for b in blocks if b.startswith("layer1.")]
    chosen = choose_blocks_to_drop(model, stage, 2, criterion, probes=probes)
    scores = get_block_criterion(criterion)(model, stage, probes=probes)
    assert len(set(chosen)) == 2 and set(chosen) <= set(stage)
    assert scores[chosen[0]] <= scores[chosen[1]] <= min(
        v for k, v in scores.items() if k not in chosen)
    assert choose_blocks_to_drop(model, stage, 1, criterion, probes=probes) == chosen[:1]


@pytest.mark.parametrize("criterion", DATA_DRIVEN)
def test_data_driven_criteria_need_probes(resnet20, criterion):
    model, blocks = resnet20
    with pytest.raises(ValueError, match=criterion):
        get_block_criterion(criterion)(model, blocks)
    with pytest.raises(ValueError, match=criterion):
        choose_blocks_to_drop(model, blocks, 1, criterion)


def test_position_drops_the_last_block_first(resnet20):
    model, blocks = resnet20
    assert choose_blocks_to_drop(model, ["layer1.0", "layer1.1", "layer1.2"], 1,
                                 "position") == ["layer1.2"]
    assert choose_blocks_to_drop(model, ["layer3.1", "layer3.2"], 2,
                                 "position") == ["layer3.2", "layer3.1"]


def test_weight_norm_is_the_mean_absolute_parameter(resnet20):
    model, _ = resnet20
    block = model.get_submodule("layer1.1")
    expected = torch.cat([p.detach().abs().flatten() for p in block.parameters()]).double().mean()
    score = get_block_criterion("weight_norm")(model, ["layer1.1"])["layer1.1"]
    assert score == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("criterion", DATA_DRIVEN)
def test_a_no_op_block_scores_lowest(resnet20, probes, criterion):
    model, blocks = resnet20
    make_no_op(model)
    scores = get_block_criterion(criterion)(model, blocks, probes=probes)
    assert scores[NO_OP] == pytest.approx(0.0, abs=1e-9)
    assert min(v for k, v in scores.items() if k != NO_OP) > 1e-6
    assert choose_blocks_to_drop(model, blocks, 1, criterion, probes=probes) == [NO_OP]


def test_cka_needs_two_probes(resnet20, probes):
    model, blocks = resnet20
    with pytest.raises(ValueError, match="2 probes"):
        get_block_criterion("cka")(model, blocks, probes=probes[:1])


def test_linear_cka_is_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, torch.randn(50, 6, generator=g)) < 0.5


def test_choose_validates_its_arguments(resnet20):
    model, blocks = resnet20
    with pytest.raises(ValueError, match="n_drop"):
        choose_blocks_to_drop(model, blocks[:2], 3, "position")
    with pytest.raises(KeyError, match="position"):
        choose_blocks_to_drop(model, blocks, 1, "no-such-criterion")
    assert choose_blocks_to_drop(model, blocks, 0, "position") == []


def test_registered_criterion_is_usable_by_name(resnet20):
    model, blocks = resnet20
    name = "_test_by_name_length"
    try:
        register_block_criterion(name)(
            lambda model, blocks, *, probes=None: {b: -float(len(b)) for b in blocks})
        assert choose_blocks_to_drop(model, ["layer1.0", "layer1.1"], 1, name) == ["layer1.1"]
    finally:
        BLOCK_CRITERIA.pop(name, None)
