"""SpaceConfig / RatioRange validation and the Optuna distributions they produce."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import ValidationError

from prunetune.spaces import (
    IMPORTANCES,
    PruningVector,
    RatioRange,
    SpaceConfig,
    discover,
    materialize,
    optuna_distributions,
)


@pytest.fixture
def r20_space(make_model):
    return discover(make_model("cifar:resnet20"))


def test_defaults_for_resnet20(r20_space):
    dists = optuna_distributions(r20_space, SpaceConfig())
    stages = ("layer1", "layer2", "layer3")
    assert set(dists) == {f"ch.{s}" for s in stages} | {f"depth.{s}" for s in stages}
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
    # One block per stage: nothing to search in depth.
    r8 = optuna_distributions(discover(make_model("cifar:resnet8")), SpaceConfig())
    assert not any(k.startswith("depth.") for k in r8)


def test_fixed_ratio_has_no_channel_distribution(r20_space):
    cfg = SpaceConfig(channel_ratio=RatioRange(low=0.5, high=0.5))
    assert not any(k.startswith("ch.") for k in optuna_distributions(r20_space, cfg))


def test_custom_range_and_continuous_step(r20_space):
    cfg = SpaceConfig(channel_ratio=RatioRange(low=0.5, high=1.0, step=None))
    assert optuna_distributions(r20_space, cfg)["ch.layer2"] == FloatDistribution(0.5, 1.0)


def test_sampled_points_materialize(r20_space, make_model):
    """Every point Optuna can sample is a valid vector for the model it was derived from."""
    parent = make_model("cifar:resnet20")
    dists = optuna_distributions(r20_space, SpaceConfig(resolutions=[8, 16]))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask(dists)
        vec = PruningVector.from_flat({k: str(v) for k, v in trial.params.items()})
        sub = materialize(parent, vec, in_channels=1, native_resolution=16)
        assert sub.spec.resolution == trial.params["resolution"]
        assert sub.spec.vector.to_flat() == trial.params


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
