"""SpaceConfig / RatioRange validation and the Optuna distributions they produce from an
engine `ModelStructure` (see `describe`)."""

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import ValidationError
from torch import nn
from torchvision.models import VisionTransformer

from prunetune.spaces import (
    IMPORTANCES,
    PruningVector,
    RatioRange,
    SpaceConfig,
    describe,
    optuna_distributions,
    prune,
)
from prunetune.spaces.block_criteria import BLOCK_CRITERIA

pytestmark = pytest.mark.filterwarnings("ignore:Unwrapped parameters")

X = torch.zeros(1, 1, 16, 16)
X_VIT = torch.zeros(1, 3, 32, 32)


@pytest.fixture
def r20_space(make_model):
    return describe(make_model("cifar:resnet20"), X)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                              mlp_dim=64, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the classifier
    model.eval()
    return model, describe(model, X_VIT)


def test_defaults_for_resnet20(r20_space):
    dists = optuna_distributions(r20_space, SpaceConfig())
    stages = ("layer1", "layer2", "layer3")
    assert set(dists) == {f"ch.{s}" for s in stages} | {f"depth.{s}" for s in stages}
    assert not any(k.startswith("heads.") for k in dists)  # no attention in a ResNet
    for s in stages:
        assert dists[f"ch.{s}"] == FloatDistribution(0.25, 1.0, step=0.125)
        assert dists[f"depth.{s}"] == IntDistribution(1, 3)


def test_resolution_only_with_several_choices(r20_space):
    assert "resolution" not in optuna_distributions(r20_space, SpaceConfig(resolutions=[16]))
    dists = optuna_distributions(r20_space, SpaceConfig(resolutions=[32, 16, 24, 16]))
    assert dists["resolution"] == CategoricalDistribution([16, 24, 32])


def test_depth_false_removes_depth_keys(r20_space):
    dists = optuna_distributions(r20_space, SpaceConfig(depth=False))
    assert set(dists) == {"ch.layer1", "ch.layer2", "ch.layer3"}


def test_min_blocks_and_single_block_stages(r20_space, make_model):
    dists = optuna_distributions(r20_space, SpaceConfig(min_blocks=2))
    assert dists["depth.layer1"] == IntDistribution(2, 3)
    assert dists["depth.layer2"] == dists["depth.layer3"] == IntDistribution(2, 3)
    # min_blocks above a stage's depth leaves nothing to search there.
    assert not any(k.startswith("depth.") for k in optuna_distributions(r20_space, SpaceConfig(min_blocks=3)))
    # One block per stage: nothing to search in depth.
    r8 = optuna_distributions(describe(make_model("cifar:resnet8"), X), SpaceConfig())
    assert not any(k.startswith("depth.") for k in r8)
    assert sum(k.startswith("ch.") for k in r8) == 3


def test_fixed_ratio_has_no_channel_distribution(r20_space):
    cfg = SpaceConfig(channel_ratio=RatioRange(low=0.5, high=0.5))
    assert not any(k.startswith("ch.") for k in optuna_distributions(r20_space, cfg))


def test_custom_range_and_continuous_step(r20_space):
    cfg = SpaceConfig(channel_ratio=RatioRange(low=0.5, high=1.0, step=None))
    assert optuna_distributions(r20_space, cfg)["ch.layer2"] == FloatDistribution(0.5, 1.0)


def test_heads_only_for_transformers(vit):
    _, structure = vit
    dists = optuna_distributions(structure, SpaceConfig())
    (stage,) = [s.name for s in structure.channel_stages if s.attention]
    assert dists[f"heads.{stage}"] == FloatDistribution(0.5, 1.0, step=0.25)
    assert [k for k in dists if k.startswith("heads.")] == [f"heads.{stage}"]
    cfg = SpaceConfig(head_ratio=RatioRange(low=0.5, high=0.5))
    assert not any(k.startswith("heads.") for k in optuna_distributions(structure, cfg))
    assert optuna_distributions(structure, SpaceConfig(head_ratio=RatioRange(low=0.25, step=None)))[
        f"heads.{stage}"] == FloatDistribution(0.25, 1.0)


def test_sampled_points_prune(r20_space, make_model):
    """Every point Optuna can sample is a valid vector for the model it was derived from."""
    parent = make_model("cifar:resnet20")
    dists = optuna_distributions(r20_space, SpaceConfig(resolutions=[8, 16]))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):
        trial = study.ask(dists)
        vec = PruningVector.from_flat({k: str(v) for k, v in trial.params.items()})
        sub = prune(parent, vec, X, structure=r20_space)
        assert sub.spec.resolution == trial.params["resolution"]
        assert sub.spec.vector.to_flat() == trial.params
        res = trial.params["resolution"]
        with torch.no_grad():
            assert sub.module(torch.randn(1, 1, res, res)).shape == (1, 10)


def test_sampled_transformer_points_prune(vit):
    model, structure = vit
    dists = optuna_distributions(structure, SpaceConfig(channel_ratio=RatioRange(low=0.5)))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(4):
        trial = study.ask(dists)
        vec = PruningVector.from_flat({k: str(v) for k, v in trial.params.items()})
        sub = prune(model, vec, X_VIT, structure=structure)
        assert sub.spec.vector.to_flat() == trial.params
        assert set(sub.spec.heads) <= set(structure.attention)
        with torch.no_grad():
            assert sub.module(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"low": 0}, "low"), ({"low": -0.1}, "low"), ({"high": 1.2}, "high"), ({"high": 0}, "high")],
)
def test_ratio_range_rejects_out_of_unit_bounds(kwargs, field):
    with pytest.raises(ValidationError) as err:
        RatioRange(**kwargs)
    assert any(e["loc"] == (field,) for e in err.value.errors())


def test_ratio_range_rejects_low_above_high():
    with pytest.raises(ValidationError, match="low") as err:
        RatioRange(low=0.8, high=0.5)
    assert "high" in str(err.value)


@pytest.mark.parametrize("step", [0, 1.5])
def test_ratio_range_rejects_bad_step(step):
    with pytest.raises(ValidationError, match="step"):
        RatioRange(step=step)


def test_ratio_range_rejects_unknown_keys():
    with pytest.raises(ValidationError) as err:
        RatioRange(lo=0.5)
    assert err.value.errors()[0]["loc"] == ("lo",)


def test_space_config_rejects_unknown_importance():
    with pytest.raises(ValidationError) as err:
        SpaceConfig(importance="taylor-magic")
    assert err.value.errors()[0]["loc"] == ("importance",)
    assert "taylor-magic" in str(err.value)


@pytest.mark.parametrize("importance", sorted(IMPORTANCES))
def test_space_config_accepts_every_registered_importance(importance):
    assert SpaceConfig(importance=importance).importance == importance


def test_space_config_rejects_unknown_block_criterion():
    with pytest.raises(ValidationError) as err:
        SpaceConfig(block_criterion="coin-flip")
    assert err.value.errors()[0]["loc"] == ("block_criterion",)
    assert "coin-flip" in str(err.value) and "position" in str(err.value)


@pytest.mark.parametrize("criterion", sorted(BLOCK_CRITERIA))
def test_space_config_accepts_every_registered_block_criterion(criterion):
    assert SpaceConfig(block_criterion=criterion).block_criterion == criterion


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"chanel_ratio": {"low": 0.5}}, ("chanel_ratio",)),
        ({"channel_ratio": {"low": 0.5, "extra": 1}}, ("channel_ratio", "extra")),
        ({"granularity": "layer"}, ("granularity",)),
        ({"min_blocks": 0}, ("min_blocks",)),
        ({"round_to": 0}, ("round_to",)),
        ({"resolutions": []}, ("resolutions",)),
        ({"resolutions": [2, 16]}, ("resolutions",)),
    ],
)
def test_space_config_rejects_bad_fields(kwargs, loc):
    with pytest.raises(ValidationError) as err:
        SpaceConfig(**kwargs)
    assert err.value.errors()[0]["loc"] == loc


def test_space_config_parses_a_yaml_like_dict():
    cfg = SpaceConfig.model_validate({"channel_ratio": {"low": 0.5, "step": 0.25},
                                      "resolutions": [16, 32], "importance": "l1", "round_to": 8})
    assert cfg.channel_ratio == RatioRange(low=0.5, high=1.0, step=0.25)
    assert cfg.depth is True and cfg.min_blocks == 1
    assert cfg.block_criterion == "position" and cfg.head_ratio == RatioRange(low=0.5, high=1.0, step=0.25)
