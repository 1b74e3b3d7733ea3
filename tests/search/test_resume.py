"""Kill a search's driver mid-search (a real `prunetune search` process, SIGKILL), then
`--resume`: finished trials are kept and not rerun, interrupted ones are closed honestly, the
budget is completed, and no trial has two active child runs in MLflow."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from prunetune.search.cli import main
from prunetune.search.config import load_config
from prunetune.search.resume import NothingToResume
from prunetune.search.runner import run_search
from prunetune.search.tracking import PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG

TRIALS = 6


def _config(tmp_path, cache_dir):
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump({
        "name": "resume", "seed": 4,
        "model": {"name": "cifar:resnet8"},
        "data": {"name": "digits", "image_size": 12, "val_fraction": 0.15, "limit_train": 600},
        "parent": {"recipe": {"epochs": 2, "batch_size": 64}},
        "budget": {"trials": TRIALS, "concurrency": 1},
        "finetune": {"epochs": 3, "batch_size": 32},
        "probes": {"size": 32}, "cost": {"latency": False},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "ray": {"storage_path": str(tmp_path / "ray_results")},
        "cache_dir": str(cache_dir),
    }))
    return path


def _children(client):
    exp = client.get_experiment_by_name("resume")
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=500) if r.data.tags.get(ROLE_TAG) == "trial"]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (only those: by pid)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def test_resume_after_the_driver_is_killed(ray_local, tmp_path, cache_dir):
    path = _config(tmp_path, cache_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(NothingToResume):
        run_search(load_config(path), resume=True)
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", "from prunetune.search.cli import run; run()", "search", str(path)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    client = MlflowClient(uri)
    deadline = time.monotonic() + 420
    try:
        while time.monotonic() < deadline:
            runs = _children(client) if (tmp_path / "mlflow.db").exists() else []
            finished = [r for r in runs if r.info.status == "FINISHED"]
            if len(finished) >= 2 and any(r.info.status == "RUNNING" for r in runs):
                break
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the search never had 2 finished trials and one running")
    finally:
        _kill_tree(proc)
    before = {r.data.tags[TRIAL_TAG]: r.info.run_id for r in _children(client) if r.info.status == "FINISHED"}
    assert 2 <= len(before) < TRIALS

    assert main(["search", str(path), "--resume"]) == 0
    runs = _children(client)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    interrupted = [r for r in runs if r.data.tags.get(STATUS_TAG) == "interrupted"]
    assert len(finished) == TRIALS, "the budget is completed"
    ids = [r.data.tags[TRIAL_TAG] for r in finished]
    assert len(set(ids)) == len(ids), "no trial finished twice"
    for trial_id, run_id in before.items():
        assert {r.info.run_id for r in finished if r.data.tags[TRIAL_TAG] == trial_id} == {run_id}, "not rerun"
    assert interrupted and all(r.info.status == "KILLED" for r in interrupted)
    assert {r.data.tags[PARENT_TAG] for r in runs} == {next(iter(runs)).data.tags[PARENT_TAG]}
    parent = client.get_run(runs[0].data.tags[PARENT_TAG])
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_finished"] == TRIALS
    assert main(["search", str(path), "--resume"]) == 2, "a finished search has nothing to resume"
