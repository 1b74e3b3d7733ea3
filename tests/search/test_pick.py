"""`prunetune pick` on a real search: real embedded Ray, real MLflow sqlite (tracking + Model
Registry), real training on scikit-learn's bundled digits. The search runs once per module."""

import json

import pytest
from mlflow.tracking import MlflowClient

from prunetune.search.cli import main
from prunetune.search.config import parse_config
from prunetune.search.runner import run_search

EXPERIMENT = "picktest"
EXPORTS = {"subnet.json", "weights.safetensors", "model.ts", "model.onnx", "cost.json", "pick.json"}


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("pick")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = parse_config({
        "name": EXPERIMENT, "seed": 0, "model": {"name": "cifar:resnet8"},
        "data": {"name": "digits", "image_size": 12, "val_fraction": 0.15, "limit_train": 600},
        "parent": {"recipe": {"epochs": 2, "batch_size": 64}},
        "budget": {"trials": 4, "concurrency": 2},
        "finetune": {"epochs": 1, "batch_size": 64},
        "probes": {"size": 32},
        "cost": {"latency": True, "repeats": 3},
        "tracking": {"uri": uri},
        "ray": {"storage_path": str(work / "ray_results")},
        "cache_dir": str(cache_dir),
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # MLflow's default artifact root (./mlruns) lands in the temporary folder
        outcome = run_search(cfg)
    assert outcome.front, "the search produced no front"
    return uri, outcome


def _pick(uri, out, *extra):
    return main(["pick", EXPERIMENT, "--tracking-uri", uri, "--out", str(out), *extra])


def test_pick_without_constraints_exports_verifies_and_registers(search, tmp_path, capsys):
    uri, outcome = search
    out = tmp_path / "best"
    assert _pick(uri, out) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == EXPORTS
    expected = max(outcome.front, key=lambda r: (r["val_acc"], -r["macs"]))
    record = json.loads((out / "pick.json").read_text())
    assert record["trial_id"] == expected["trial_id"] and record["trial_run_id"] == expected["mlflow_run_id"]
    assert record["search_run_id"] == outcome.target.parent_run_id and record["constraints"] == {}
    assert record["test_acc_reevaluated"] == pytest.approx(expected["test_acc"], abs=1e-6)
    assert "warning" not in printed
    for step in ("downloading", "rebuilding", "evaluating", "exporting", "registering"):
        assert step in printed
    assert main(["verify", str(out)]) == 0

    name = f"{EXPERIMENT}-subnet"
    assert record["registered_model"]["name"] == name
    (version,) = MlflowClient(uri).search_model_versions(f"name='{name}'")
    assert int(version.version) == record["registered_model"]["version"]
    assert version.run_id == expected["mlflow_run_id"]
    assert version.source == f"runs:/{expected['mlflow_run_id']}/subnet"
    tags = version.tags
    assert tags["prunetune.experiment"] == EXPERIMENT
    assert tags["prunetune.search_run_id"] == outcome.target.parent_run_id
    assert tags["prunetune.trial_id"] == expected["trial_id"]
    assert tags["prunetune.parent_id"] == "cifar:resnet8" and tags["prunetune.policy"] == "joint"
    assert json.loads(tags["prunetune.vector"]) == json.loads((out / "subnet.json").read_text())["vector"]
    assert float(tags["prunetune.val_acc"]) == expected["val_acc"] and int(tags["prunetune.macs"]) == expected["macs"]


def test_max_macs_between_two_members_picks_the_cheaper_side(search, tmp_path):
    uri, outcome = search
    by_macs = sorted(outcome.front, key=lambda r: r["macs"])
    assert by_macs[-2]["macs"] < by_macs[-1]["macs"], "the front needs two members with distinct MACs"
    limit = (by_macs[-2]["macs"] + by_macs[-1]["macs"]) / 2
    expected = max((r for r in outcome.front if r["macs"] <= limit), key=lambda r: (r["val_acc"], -r["macs"]))
    out = tmp_path / "cheap"
    assert _pick(uri, out, "--max-macs", str(limit), "--model-name", "picktest-cheap") == 0
    record = json.loads((out / "pick.json").read_text())
    assert record["trial_id"] == expected["trial_id"] and record["constraints"] == {"max_macs": limit}


def test_constraint_that_excludes_everything_exits_2_and_names_it(search, tmp_path, capsys):
    uri, outcome = search
    out = tmp_path / "none"
    assert _pick(uri, out, "--max-macs", "1000", "--min-accuracy", "0.01") == 2
    printed = capsys.readouterr().out
    n = len(outcome.front)
    assert f"--max-macs 0.001M excludes {n} of {n}" in printed and f"--min-accuracy 0.01 excludes 0 of {n}" in printed
    assert "> --max-macs 0.001M (+" in printed
    assert not out.exists()


def test_unknown_experiment_and_non_empty_out_exit_2(search, tmp_path, capsys):
    uri, _ = search
    assert main(["pick", "no-such-exp", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2
    assert "no MLflow experiment named 'no-such-exp'" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert _pick(uri, busy) == 2
    assert f"--out {busy}" in capsys.readouterr().out
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("flags,message", [
    (["--max-macs", "0"], "--max-macs: must be a positive number"),
    (["--max-latency-ms", "-1"], "--max-latency-ms: must be a positive number"),
    (["--min-accuracy", "1.5"], "--min-accuracy: must be a validation accuracy in [0, 1]"),
])
def test_bad_constraint_flags_exit_2_before_anything(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["pick", "anything", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "--out", str(out),
                 *flags]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "none.db").exists()
