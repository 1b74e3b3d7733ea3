"""The MLflow server behind basic auth, as in the cluster example: requests without credentials
are refused (and the CLI says so in one line, exit 2); a search launched on the local cluster
logs every trial with credentials that come from the environment (`launch --env`), never YAML."""

from __future__ import annotations

import contextlib
import io
import secrets
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from prunetune.cluster import jobs
from prunetune.cluster.mlflow_local import LocalMlflowServer
from prunetune.search.cli import main

from .conftest import point_at
from prunetune.search.tracking import ROLE_TAG

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """An MLflow server with `--app-name basic-auth`, its admin password generated here."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(16)
    ini = root / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = admin\nadmin_password = {password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    ini.chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
        mp.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(16))
        server = LocalMlflowServer(root / "server", basic_auth=True).start()
    yield server, password
    server.stop()


def test_requests_without_credentials_are_refused(auth_server, monkeypatch, capsys):
    server, _ = auth_server
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(Exception, match="401|nauthenticated|not authenticated"):
        MlflowClient(server.uri).search_experiments()
    assert main(["front", "anything", "--tracking-uri", server.uri]) == 2
    out = capsys.readouterr().out
    assert "MLFLOW_TRACKING_USERNAME" in out and "Traceback" not in out


def test_launched_search_logs_with_credentials_from_the_environment(auth_server, local_cluster, tmp_path):
    server, password = auth_server
    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg.update(name="auth", budget={"trials": 2, "concurrency": 2}, probes={"size": 64},
               tracking={"uri": server.uri}, cache_dir=str(tmp_path / "cache"),
               ray={"storage_path": str(tmp_path / "ray_results")})
    cfg["model"]["name"] = "cifar:resnet8"
    cfg["parent"]["recipe"]["epochs"] = 1
    cfg["finetune"]["epochs"] = 1
    (tmp_path / "exp").mkdir()
    config = tmp_path / "exp" / "auth.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert password not in config.read_text()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        point_at(mp, local_cluster)
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        code = main(["launch", str(config), "--address", local_cluster.dashboard_url, "--no-pip",
                     "--env", "MLFLOW_TRACKING_USERNAME", "--env", "MLFLOW_TRACKING_PASSWORD"])
        assert code == 0, out.getvalue()[-3000:]
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("auth")
        runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert password not in out.getvalue(), "the secret was printed"
