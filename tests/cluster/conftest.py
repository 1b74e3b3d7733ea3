"""Real local clusters for the cluster tests: `ray start` processes and an `mlflow server`.

`local_cluster`: a head (0 CPUs, the dashboard/Jobs API, job drivers) and 2 worker nodes of
1 CPU, token auth on, every socket on 127.0.0.1; one for the whole session (starting one costs
~15 s), stopped at its end; a test that kills a worker adds one back. `mlflow_server`: an MLflow server on 127.0.0.1 with a sqlite
store in the module's temp folder. `cluster_env`: this process's environment pointed at the
cluster (RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, RAY_API_SERVER_ADDRESS), for CLI calls.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prunetune.cluster.local import LocalCluster
from prunetune.cluster.mlflow_local import LocalMlflowServer


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory):
    cluster = LocalCluster(workers=2, cpus_per_worker=1, state_dir=tmp_path_factory.mktemp("cluster-state"))
    cluster.up()
    yield cluster
    cluster.down()
    assert not cluster.survivors(), "processes of the local cluster survived down()"


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def small_quickstart(folder: Path, *, tracking_uri: str, cache: Path, name: str = "quickstart", trials: int = 2,
                     parent_epochs: int = 1, finetune_epochs: int = 1, model: str | None = None,
                     **ray) -> Path:
    """configs/quickstart.yaml with a small budget, tracked on `tracking_uri`, written to
    `folder/exp/NAME.yaml` (the folder `launch` ships). The job runs in a temporary copy of that
    folder on the head node, so every path the search writes is absolute."""
    cfg = yaml.safe_load(QUICKSTART.read_text())
    cfg.update(name=name, budget={"trials": trials, "concurrency": 2}, probes={"size": 64},
               tracking={"uri": tracking_uri}, cache_dir=str(cache),
               ray={"storage_path": str(folder / "ray_results"), **ray})
    if model:
        cfg["model"]["name"] = model
    cfg["parent"]["recipe"]["epochs"] = parent_epochs
    cfg["finetune"]["epochs"] = finetune_epochs
    (folder / "exp").mkdir()
    path = folder / "exp" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def point_at(mp: pytest.MonkeyPatch, cluster: LocalCluster) -> dict[str, str]:
    """Set this process's environment as a user's shell pointed at `cluster` would be (and no
    stray Ray address, token or tracking URI from the surrounding environment)."""
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"):
        mp.delenv(k, raising=False)
    for k, v in cluster.env().items():
        mp.setenv(k, v)
    return cluster.env()


@pytest.fixture
def cluster_env(local_cluster, monkeypatch):
    return point_at(monkeypatch, local_cluster)
