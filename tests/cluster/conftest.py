"""Real local clusters for the cluster tests: `ray start` processes and an `mlflow server`.

`local_cluster`: a head (0 CPUs, the dashboard/Jobs API, job drivers) and 2 worker nodes of
1 CPU, token auth on, every socket on 127.0.0.1; one per test module, stopped at its end (a
module may kill or add workers). `mlflow_server`: an MLflow server on 127.0.0.1 with a sqlite
store in the module's temp folder. `cluster_env`: this process's environment pointed at the
cluster (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_API_SERVER_ADDRESS), for CLI calls.
"""

from __future__ import annotations

import pytest

from prunetune.cluster.local import LocalCluster
from prunetune.cluster.mlflow_local import LocalMlflowServer


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    cluster = LocalCluster(workers=2, cpus_per_worker=1, state_dir=tmp_path_factory.mktemp("cluster-state"))
    cluster.up()
    yield cluster
    cluster.down()
    assert not cluster.survivors(), "processes of the local cluster survived down()"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture
def cluster_env(local_cluster, monkeypatch):
    for k in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in local_cluster.env().items():
        monkeypatch.setenv(k, v)
    return local_cluster.env()
