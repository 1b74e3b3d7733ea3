"""`prunetune launch` runs the quickstart on the local cluster, tracked by a real MLflow server;
`prunetune jobs list/logs/stop` work; bad input stops before anything is submitted (exit 2)."""

from __future__ import annotations

import contextlib
import io
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from prunetune.search.cli import main
from prunetune.search.tracking import PARENT_TAG, ROLE_TAG

from .conftest import point_at, small_quickstart

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def launched(local_cluster, mlflow_server, tmp_path_factory):
    """One real launch of the small quickstart: (exit code, output, job id, config)."""
    folder = tmp_path_factory.mktemp("launch")
    config = small_quickstart(folder, tracking_uri=mlflow_server.uri, cache=folder / "cache")
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        point_at(mp, local_cluster)
        code = main(["launch", str(config), "--address", local_cluster.dashboard_url, "--no-pip"])
    text = out.getvalue()
    job_id = next((w for w in text.split() if w.startswith("raysubmit_")), None)
    return code, text, job_id, config


def test_launch_runs_the_search_on_the_cluster(launched, mlflow_server):
    code, out, job_id, _ = launched
    assert code == 0, out[-3000:]
    assert job_id and f"submitted job {job_id}" in out
    assert "search finished" in out and f"job {job_id} SUCCEEDED" in out
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    searches = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(searches) == 1 and searches[0].info.status == "FINISHED"
    assert len(trials) == 2
    assert {r.data.tags[PARENT_TAG] for r in trials} == {searches[0].info.run_id}
    assert all(r.info.status == "FINISHED" and "val_acc" in r.data.metrics for r in trials)


def test_jobs_list_and_logs(launched, cluster_env, capsys):
    _, _, job_id, _ = launched
    assert main(["jobs", "list"]) == 0  # address from RAY_API_SERVER_ADDRESS
    listed = capsys.readouterr().out
    assert job_id in listed and "SUCCEEDED" in listed
    assert main(["jobs", "logs", job_id]) == 0
    assert "search finished" in capsys.readouterr().out
    assert main(["jobs", "logs", "raysubmit_doesnotexist"]) == 2
    assert "raysubmit_doesnotexist" in capsys.readouterr().out


def test_jobs_stop(local_cluster, cluster_env, capsys):
    from prunetune.cluster import jobs

    client = jobs.client(local_cluster.dashboard_url)
    job_id = client.submit_job(entrypoint="python -c 'import time; time.sleep(600)'")
    deadline = time.monotonic() + 60
    while client.get_job_status(job_id).value != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert main(["jobs", "stop", job_id, "--address", local_cluster.dashboard_url]) == 0
    assert f"stopping job {job_id}" in capsys.readouterr().out
    assert jobs.wait(client, job_id, timeout_s=30) == "STOPPED"
    assert main(["jobs", "stop", "raysubmit_doesnotexist"]) == 2


@pytest.mark.parametrize("problem", ["unknown key", "unset env", "missing requirements"])
def test_bad_input_is_refused_before_submission(launched, local_cluster, cluster_env, tmp_path, capsys, problem,
                                                monkeypatch):
    from prunetune.cluster import jobs

    _, _, _, config = launched
    before = len(jobs.client(local_cluster.dashboard_url).list_jobs())
    args = ["launch", str(config), "--no-pip"]
    if problem == "unknown key":
        cfg = yaml.safe_load(config.read_text())
        cfg["budget"]["trails"] = 3
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
        args[1], expected = str(tmp_path / "bad.yaml"), "budget.trails"
    elif problem == "unset env":
        monkeypatch.delenv("PRUNETUNE_NOT_SET", raising=False)
        args, expected = args + ["--env", "PRUNETUNE_NOT_SET"], "PRUNETUNE_NOT_SET"
    else:
        args = ["launch", str(config), "--requirements", str(tmp_path / "nope.txt")]
        expected = "nope.txt"
    assert main(args) == 2
    assert expected in capsys.readouterr().out
    assert len(jobs.client(local_cluster.dashboard_url).list_jobs()) == before
