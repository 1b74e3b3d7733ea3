import csv
import json
import math

import pytest

from prunetune.search.front_report import write_front_artifacts
from prunetune.search.pareto import Objective

OBJECTIVES = [Objective("val_acc", "max"), Objective("macs", "min")]
PARENT = {"val_acc": 0.93, "macs": 300e6, "params": 11e6}


def _records():
    base = {"ch.layer1": 0.5, "depth.layer2": 2, "resolution": 224, "params": 5e6, "test_acc": 0.9}
    return [
        {**base, "trial_id": "t0", "status": "finished", "val_acc": 0.91, "macs": 250e6},
        {**base, "trial_id": "t1", "status": "finished", "val_acc": 0.88, "macs": 120e6},
        {**base, "trial_id": "t2", "status": "finished", "val_acc": 0.85, "macs": 150e6},  # dominated
        {**base, "trial_id": "t3", "status": "finished", "val_acc": 0.80, "macs": 60e6},
        {**base, "trial_id": "t4", "status": "stopped", "val_acc": 0.95, "macs": 50e6},  # not finished
        {"trial_id": "t5", "status": "error"},
        {**base, "trial_id": "t6", "status": "finished", "val_acc": math.nan, "macs": 10e6},
    ]


def _read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_writes_all_artifacts(tmp_path):
    paths = write_front_artifacts(_records(), OBJECTIVES, tmp_path / "out", title="resnet18 front", parent=PARENT)
    assert set(paths) == {"json", "csv", "trials_csv", "png", "html"}
    assert all(p.is_file() for p in paths.values())

    doc = json.loads(paths["json"].read_text())
    assert doc["objectives"] == [{"metric": "val_acc", "mode": "max"}, {"metric": "macs", "mode": "min"}]
    assert [r["trial_id"] for r in doc["front"]] == ["t3", "t1", "t0"]  # ascending val_acc
    assert doc["n_trials"] == 7
    assert doc["reference_point"] == pytest.approx([0.0, 330e6])
    expected_hv = 0.80 * (330e6 - 60e6) + 0.08 * (330e6 - 120e6) + 0.03 * (330e6 - 250e6)
    assert doc["hypervolume"] == pytest.approx(expected_hv)

    assert _is_png(paths["png"])

    front_rows = _read_csv(paths["csv"])
    with paths["csv"].open() as fh:
        header = fh.readline().strip().split(",")
    assert header[:3] == ["trial_id", "val_acc", "macs"]
    assert header[3:] == sorted(header[3:])
    assert [r["trial_id"] for r in front_rows] == ["t3", "t1", "t0"]

    trials = {r["trial_id"]: r for r in _read_csv(paths["trials_csv"])}
    assert set(trials) == {f"t{i}" for i in range(7)}
    assert {k: int(trials[k]["pareto_rank"]) for k in trials} == {
        "t0": 0, "t1": 0, "t2": 1, "t3": 0, "t4": -1, "t5": -1, "t6": -1,
    }
    assert trials["t5"]["val_acc"] == ""


def test_without_parent_leaves_hypervolume_null(tmp_path):
    objectives = [Objective("macs", "min"), Objective("val_acc", "max")]
    paths = write_front_artifacts(_records(), objectives, tmp_path, title="no parent")
    doc = json.loads(paths["json"].read_text())
    assert [r["trial_id"] for r in doc["front"]] == ["t3", "t1", "t0"]  # ascending macs
    assert doc["hypervolume"] is None and doc["reference_point"] is None
    assert _is_png(paths["png"])


def test_zero_finished_trials(tmp_path):
    records = [r for r in _records() if r["status"] != "finished"]
    paths = write_front_artifacts(records, OBJECTIVES, tmp_path, title="empty", parent=PARENT)
    doc = json.loads(paths["json"].read_text())
    assert doc["front"] == [] and doc["hypervolume"] == 0.0 and doc["n_trials"] == 2
    assert _read_csv(paths["csv"]) == []
    assert paths["csv"].read_text().startswith("trial_id,")
    assert len(_read_csv(paths["trials_csv"])) == 2
    assert _is_png(paths["png"])


def test_no_records_at_all(tmp_path):
    paths = write_front_artifacts([], OBJECTIVES, tmp_path, title="nothing")
    assert json.loads(paths["json"].read_text())["front"] == []
    assert _is_png(paths["png"])


def test_needs_two_objectives(tmp_path):
    with pytest.raises(ValueError):
        write_front_artifacts(_records(), OBJECTIVES[:1], tmp_path, title="x")
