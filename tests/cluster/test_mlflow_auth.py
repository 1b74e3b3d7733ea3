"""The MLflow server behind basic auth, as in the cluster example: requests without credentials
are refused (and the CLI says so in one line, exit 2); a search launched on the local cluster
logs every trial with credentials that come from the environment (`launch --env`), never YAML."""

from __future__ import annotations

import contextlib
import io
import secrets

import pytest
from mlflow.tracking import MlflowClient

from prunetune.cluster.mlflow_local import LocalMlflowServer
from prunetune.search.cli import main

from .conftest import point_at, small_quickstart
from prunetune.search.tracking import ROLE_TAG

pytestmark = pytest.mark.slow


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
    config = small_quickstart(tmp_path, tracking_uri=server.uri, cache=tmp_path / "cache", name="auth",
                              model="cifar:resnet8")
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
