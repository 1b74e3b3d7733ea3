"""The local MLflow server: real `mlflow server` on loopback, data kept across a restart."""

from __future__ import annotations


import pytest
from mlflow.tracking import MlflowClient

from prunetune.cluster.mlflow_local import LocalMlflowServer, MlflowServerError

pytestmark = pytest.mark.slow


def test_restart_keeps_port_and_store_and_stop_leaves_nothing(tmp_path):
    server = LocalMlflowServer(tmp_path / "mlf").start()
    try:
        assert server.uri.startswith("http://127.0.0.1:")
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("e"))
        (tmp_path / "a.txt").write_text("artifact")
        client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
        uri, members = server.uri, server.survivors()
        listening = [c.laddr for p in members for c in p.net_connections("inet") if c.status == "LISTEN"]
        assert listening and all(a.ip == "127.0.0.1" for a in listening)
        server.restart()
        assert server.uri == uri
        again = MlflowClient(server.uri)
        assert again.get_run(run.info.run_id).info.status == "RUNNING"
        assert [f.path for f in again.list_artifacts(run.info.run_id)] == ["a.txt"]
        assert (tmp_path / "mlf" / "artifacts").is_dir()
        # another process finds it by its folder
        assert LocalMlflowServer.load(tmp_path / "mlf").uri == uri
    finally:
        server.stop()
    assert not server.survivors() and not server.alive()
    with pytest.raises(MlflowServerError, match="no MLflow server recorded"):
        LocalMlflowServer.load(tmp_path / "mlf")


