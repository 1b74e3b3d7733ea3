"""PruningVector: flat form round-trips, including the string values MLflow stores."""

import pytest
from pydantic import ValidationError

from prunetune.spaces import PruningVector


@pytest.mark.parametrize(
    "vector",
    [
        PruningVector(),
        PruningVector(channels={"layer1": 0.5}),
        PruningVector(channels={"layer1": 0.5, "layer3": 0.125}, depth={"layer2": 1, "layer3": 3},
                      resolution=16),
        PruningVector(depth={"layer4": 2}, resolution=224),
        PruningVector(channels={"features.stage.1": 0.75}),  # dotted stage names survive
    ],
)
def test_flat_round_trip(vector):
    flat = vector.to_flat()
    assert PruningVector.from_flat(flat) == vector


def test_flat_keys():
    v = PruningVector(channels={"layer1": 0.5}, depth={"layer2": 1}, resolution=16)
    assert v.to_flat() == {"ch.layer1": 0.5, "depth.layer2": 1, "resolution": 16}
    assert "resolution" not in PruningVector(channels={"layer1": 0.5}).to_flat()


def test_from_flat_accepts_mlflow_strings():
    flat = {"ch.layer1": "0.5", "ch.layer2": "0.125", "depth.layer2": "3",
            "depth.layer3": "2.0", "resolution": "16"}
    v = PruningVector.from_flat(flat)
    assert v == PruningVector(channels={"layer1": 0.5, "layer2": 0.125},
                              depth={"layer2": 3, "layer3": 2}, resolution=16)
    assert isinstance(v.depth["layer2"], int) and isinstance(v.resolution, int)
    assert isinstance(v.channels["layer1"], float)


def test_from_flat_reads_a_stringified_vector_back():
    v = PruningVector(channels={"layer1": 0.375}, depth={"layer2": 2}, resolution=24)
    as_mlflow = {k: str(x) for k, x in v.to_flat().items()}
    assert PruningVector.from_flat(as_mlflow) == v


@pytest.mark.parametrize("res", [None, "None"])
def test_from_flat_missing_or_none_resolution(res):
    flat = {"ch.layer1": "0.5"}
    if res is not None:
        flat["resolution"] = res
    assert PruningVector.from_flat(flat).resolution is None


def test_from_flat_ignores_other_run_params():
    flat = {"ch.layer1": "0.5", "lr": "0.1", "epochs": "3", "model": "cifar:resnet20"}
    assert PruningVector.from_flat(flat) == PruningVector(channels={"layer1": 0.5})


def test_vector_is_frozen_and_strict():
    v = PruningVector(channels={"layer1": 0.5})
    with pytest.raises(ValidationError):
        v.resolution = 8
    with pytest.raises(ValidationError, match="width"):
        PruningVector(width={"layer1": 0.5})
