"""The numerical-gradient searcher: the optimiser on a known function, the cost projection,
and a real search it drives through Ray Tune."""

import numpy as np
import optuna
import pytest

from prunetune.search.config import ConfigError, parse_config
from prunetune.search.numerical_gradient import (Coordinate, GradientConfig, NumericalGradient, coordinates,
                                                 projector, scalarise)
from prunetune.search.runner import run_search


def _run(opt, f, iterations):
    while opt.iteration < iterations:
        point, u = opt.ask()
        opt.tell(point, f(u))


def test_descends_a_quadratic():
    target = np.array([0.2, 0.7, 0.4])
    opt = NumericalGradient([Coordinate(k, None) for k in "abc"], GradientConfig(pairs=3, lr=0.1, sigma=0.1), seed=0)
    start = float(np.sum((opt.x - target) ** 2))
    _run(opt, lambda u: float(np.sum((u - target) ** 2)), 15)
    assert float(np.sum((opt.x - target) ** 2)) < 0.2 * start
    assert [h["iteration"] for h in opt.history] == list(range(15))


def test_sigma_grows_on_a_flat_function_and_points_are_antithetic():
    opt = NumericalGradient([Coordinate("a", None), Coordinate("b", None)], GradientConfig(pairs=1, sigma=0.1), seed=1)
    points = dict(opt.ask() for _ in range(3))
    assert opt.ask() is None, "the next iteration waits for this one"
    np.testing.assert_allclose(points["0:+0"] + points["0:-0"], 2 * points["0:c"], atol=1e-12)
    for name in points:
        opt.tell(name, 1.0)
    assert opt.sigma == pytest.approx(0.15) and opt.iteration == 1


def test_discrete_coordinates_round_to_valid_values():
    coords = coordinates({"depth.s": optuna.distributions.IntDistribution(1, 3),
                          "resolution": optuna.distributions.CategoricalDistribution([16, 8, 12]),
                          "ch.s": optuna.distributions.FloatDistribution(0.25, 1.0)})
    assert [c.decode(0.49) for c in coords] == [2, 12, pytest.approx(0.6175)]
    assert [c.decode(1.7) for c in coords] == [3, 16, 1.0]
    stepped = coordinates({"ch.s": optuna.distributions.FloatDistribution(0.25, 1.0, step=0.125)})[0]
    assert stepped.decode(0.49) == pytest.approx(0.625) and stepped.decode(0.0) == 0.25


def test_projection_scales_channels_into_the_budget():
    coords = [Coordinate("ch.a", None, 0.25, 1.0), Coordinate("depth.a", [1, 2, 3])]
    macs = lambda flat: 100 * flat["ch.a"] ** 2 * flat["depth.a"]  # noqa: E731 - a known cost surface
    project = projector(coords, macs, budget=60)
    x = project(np.array([1.0, 1.0]))
    decoded = {c.key: c.decode(v) for c, v in zip(coords, x)}
    assert macs(decoded) <= 60 and macs(decoded) > 55 and x[1] == 1.0


def test_scalarised_objectives():
    cfg = GradientConfig(target_macs_ratio=0.5, penalty=2.0)
    assert scalarise(cfg, 0.3, 40, 100) == 0.3 and scalarise(cfg, 0.3, 60, 100) == pytest.approx(0.3 + 2 * 0.2)
    assert scalarise(cfg.model_copy(update={"objective": "penalty"}), 0.3, 60, 100) == pytest.approx(1.5)


def test_needs_one_vector_policy():
    base = {"name": "g", "model": {"name": "cifar:resnet8"}, "data": {"name": "digits"}}
    with pytest.raises(ConfigError, match="gradient moves the pruning vector"):
        parse_config({**base, "sampler": {"name": "gradient"}, "policy": {"name": "sap"}})


def test_drives_a_real_search(ray_local, tmp_path, digits_search):
    cfg = parse_config(digits_search(
        tmp_path, "gradient", data={"name": "digits", "image_size": 12, "val_fraction": 0.15, "limit_train": 500},
        space={"resolutions": [8, 12]}, budget={"trials": 6, "concurrency": 2},
        sampler={"name": "gradient", "gradient": {"pairs": 1, "target_macs_ratio": 0.5}}))
    outcome = run_search(cfg)
    by_point = {r["gradient.point"]: r for r in outcome.records}
    assert set(by_point) == {"0:c", "0:+0", "0:-0", "1:c", "1:+0", "1:-0"}
    assert all(r["status"] == "finished" for r in outcome.records)
    keys = [k for k in by_point["0:c"] if k.startswith(("ch.", "depth.")) or k == "resolution"]
    assert any(by_point["0:c"][k] != by_point["1:c"][k] for k in keys), "the centre moved"
    parent_macs = outcome.front_doc["reference_point"][1] / 1.1
    assert by_point["0:c"]["macs"] <= 0.5 * parent_macs * 1.001 and by_point["1:c"]["macs"] <= 0.5 * parent_macs * 1.001
