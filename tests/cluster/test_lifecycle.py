"""`cluster up/status/down` from the CLI leave nothing behind, job drivers included; a node that
cannot start is named and everything already started is stopped again."""

from __future__ import annotations

import time

import psutil
import pytest

from prunetune.cluster import processes
from prunetune.cluster.local import ClusterError, LocalCluster
from prunetune.search.cli import main

pytestmark = pytest.mark.slow


def _alive(pids) -> list[int]:
    out = []
    for pid, started in pids:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def test_up_status_kill_down_leaves_no_process(tmp_path, capsys, monkeypatch):
    state = tmp_path / "state"
    assert main(["cluster", "up", "--workers", "1", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    cluster = LocalCluster.load(state)
    assert cluster.dashboard_url in out and cluster.address in out and str(cluster.token_file) in out
    assert f"RAY_AUTH_TOKEN_PATH={cluster.token_file}" in out
    assert main(["cluster", "status", "--state-dir", str(state)]) == 0
    assert "worker-0" in capsys.readouterr().out

    # a job whose driver Ray starts in a session of its own
    from ray.job_submission import JobSubmissionClient

    token = cluster.token_file.read_text().strip()
    client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(entrypoint="python -c 'import time; time.sleep(600)'")
    deadline = time.monotonic() + 60
    while client.get_job_status(job).value != "RUNNING":
        assert time.monotonic() < deadline, "the sleeping job did not start"
        time.sleep(0.5)
    members = processes.members(n.leader for n in cluster.nodes)
    tracked = [(p.pid, p.create_time()) for p in members]
    assert any("sleep(600)" in " ".join(p.cmdline()) for p in members)  # the driver, found though not in our sessions
    temp_root = cluster.temp_root

    assert main(["cluster", "down", "--state-dir", str(state)]) == 0
    assert not _alive(tracked), "processes survived `cluster down`"
    assert not temp_root.exists() and not (state / "cluster.json").exists() and not (state / "auth_token").exists()
    assert main(["cluster", "down", "--state-dir", str(state)]) == 2  # nothing left to stop
    assert "no local cluster" in capsys.readouterr().out


def test_a_node_that_cannot_start_is_named_and_the_rest_stopped(tmp_path):
    cluster = LocalCluster(1, resources_per_worker={"broken": -1}, state_dir=tmp_path / "s", timeout_s=60)
    with pytest.raises(ClusterError, match="worker-0") as err:
        cluster.up()
    assert "nonnegative" in str(err.value)  # the end of the node's log comes with the error
    assert not cluster.survivors()
    assert not (tmp_path / "s" / "cluster.json").exists()
    assert cluster.temp_root is not None and not cluster.temp_root.exists()
