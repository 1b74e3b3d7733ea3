"""Faults on a real local cluster (`ray start` nodes on loopback, token auth) tracked by a real
`mlflow server`, with searches submitted through `prunetune launch` like a user's:

- a worker node is SIGKILLed mid-search: its trial resumes from its fine-tune checkpoint on the
  surviving node, the search finishes, MLflow holds every trial once, finished;
- the job's driver process is SIGKILLed, then `launch --resume` continues the search: nothing
  rerun or duplicated; the MLflow server is restarted while the resumed search logs: the
  trials retry and nothing is lost.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from prunetune.cluster import jobs
from prunetune.search.cli import main

from .conftest import point_at, small_quickstart
from prunetune.search.tracking import ROLE_TAG, STATUS_TAG, TRIAL_TAG

pytestmark = pytest.mark.slow
TRIALS = 4


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One parent cache for both searches (same model, data and recipe: trained once)."""
    return tmp_path_factory.mktemp("fault-cache")


@pytest.fixture(scope="module")
def cluster(local_cluster):
    with pytest.MonkeyPatch.context() as mp:
        point_at(mp, local_cluster)
        yield local_cluster


def _launch(cluster, config: Path, *extra: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["launch", str(config), "--address", cluster.dashboard_url, "--no-pip", "--no-follow", *extra])
    assert code == 0, out.getvalue()[-2000:]
    return next(w for w in out.getvalue().split() if w.startswith("raysubmit_"))


def _trials(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return [r for r in client.search_runs([exp.experiment_id], max_results=500)
            if r.data.tags.get(ROLE_TAG) == "trial"]


def _steps(client: MlflowClient, run) -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]


def _wait_for(pred, what: str, job: tuple, timeout_s: float = 300):
    """Poll `pred`; on timeout fail with the job's status and the end of its logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    c, job_id = job
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; job {job_id} "
                         f"{jobs.wait(c, job_id, timeout_s=0)}:\n{jobs.logs(c, job_id)[-4000:]}")


def _kill_driver(cluster, config_name: str) -> None:
    """SIGKILL the search driver of the job running `config_name`: a process the head node we
    started runs for the job (found among its descendants, by pid)."""
    head = next(n for n in cluster.nodes if n.name == "head")
    drivers = [p for p in psutil.Process(head.pid).children(recursive=True)
               if "prunetune.search.cli" in " ".join(p.cmdline()) and config_name in p.cmdline()]
    assert len(drivers) == 1, drivers
    drivers[0].kill()


def _one_finished_run_per_trial(client, runs, epochs: int) -> None:
    ids = [r.data.tags[TRIAL_TAG] for r in runs]
    assert len(ids) == len(set(ids)), f"a trial has two MLflow runs: {sorted(ids)}"
    for r in runs:
        assert r.info.status == "FINISHED", (r.data.tags[TRIAL_TAG], r.info.status)
        assert sorted(set(_steps(client, r))) == list(range(epochs + 1)), "an epoch's metrics are missing"
        assert "test_acc" in r.data.metrics and "macs" in r.data.metrics


def test_worker_node_killed_mid_search(cluster, mlflow_server, tmp_path, shared):
    epochs = 6
    config = small_quickstart(tmp_path, tracking_uri=mlflow_server.uri, cache=shared, name="ft-worker", trials=TRIALS,
                              parent_epochs=2, finetune_epochs=epochs, model="cifar:resnet8", max_failures=3)
    c = jobs.client(cluster.dashboard_url)
    job = _launch(cluster, config)
    client = MlflowClient(mlflow_server.uri)

    def both_checkpointed():   # two trials running (one per worker), each past fine-tune epoch 1
        running = [r for r in _trials(client, "ft-worker") if r.info.status == "RUNNING"]
        ready = [r for r in running if max(_steps(client, r), default=-1) >= 1]
        return len(ready) >= 2

    _wait_for(both_checkpointed, "two trials past their first fine-tune epoch", (c, job))
    time.sleep(0.5)   # the epoch-1 checkpoint is reported right after the epoch's metrics
    cluster.kill_worker(0)
    status = jobs.wait(c, job, timeout_s=600)
    logs = jobs.logs(c, job)
    cluster.add_worker()   # the module's cluster goes on with two workers
    assert status == "SUCCEEDED", logs[-3000:]
    assert "lost its worker: restarting from its last checkpoint" in logs, logs[-3000:]

    runs = _trials(client, "ft-worker")
    assert len(runs) == TRIALS
    _one_finished_run_per_trial(client, runs, epochs)
    for r in runs:   # every trial started once: the victim continued from its checkpoint
        steps = _steps(client, r)
        assert steps.count(0) == 1 and steps.count(1) == 1, (r.data.tags[TRIAL_TAG], steps)


def test_driver_killed_then_resumed_while_the_mlflow_server_restarts(cluster, mlflow_server, tmp_path, shared):
    epochs = 4
    config = small_quickstart(tmp_path, tracking_uri=mlflow_server.uri, cache=shared, name="ft-driver", trials=TRIALS,
                              parent_epochs=2, finetune_epochs=epochs, model="cifar:resnet8", max_failures=3)
    c = jobs.client(cluster.dashboard_url)
    client = MlflowClient(mlflow_server.uri)
    first = _launch(cluster, config)
    _wait_for(lambda: any(r.info.status == "FINISHED" for r in _trials(client, "ft-driver")), "a finished trial",
              (c, first))
    _kill_driver(cluster, config.name)
    assert jobs.wait(c, first, timeout_s=120) == "FAILED"
    before = {r.info.run_id: r for r in _trials(client, "ft-driver")}
    done_before = {rid for rid, r in before.items() if r.info.status == "FINISHED"}

    second = _launch(cluster, config, "--resume")
    _wait_for(lambda: any(r.info.run_id not in before and max(_steps(client, r), default=-1) >= 1
                          for r in _trials(client, "ft-driver")), "a trial of the resumed search past epoch 1",
              (c, second))
    mlflow_server.restart()
    status = jobs.wait(c, second, timeout_s=600)
    logs = jobs.logs(c, second)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resuming search run" in logs

    runs = _trials(client, "ft-driver")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == TRIALS, [(r.data.tags[TRIAL_TAG], r.info.status) for r in runs]
    assert done_before <= {r.info.run_id for r in finished}, "a trial finished before the kill was rerun"
    _one_finished_run_per_trial(client, finished, epochs)
    for r in runs:
        if r.info.status != "FINISHED":   # interrupted by the kill: closed, tagged, never reopened
            assert r.info.run_id in before and r.info.status == "KILLED"
            assert r.data.tags.get(STATUS_TAG) == "interrupted"
    exp = client.get_experiment_by_name("ft-driver")
    searches = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == "search"]
    assert len(searches) == 1 and searches[0].info.status == "FINISHED"
