"""One embedded Ray for every search test of the session (loopback only, 2 CPUs)."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    from prunetune.cluster.connect import connect, disconnect

    connect(None, num_cpus=2)
    yield
    disconnect()


@pytest.fixture(autouse=True, scope="module")
def _work_in_a_temp_folder(tmp_path_factory):
    """Searches write MLflow artifacts (./mlruns) and Ray results relative to the working folder."""
    import os

    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def digits_search(cache_dir):
    """`digits_search(work, name, **sections)`: the raw config of a small real search on digits
    (bundled with scikit-learn, CIFAR ResNet-8) that writes only under `work`; `sections`
    replace whole top-level sections."""

    def make(work, name, **sections):
        cfg = {"name": name, "seed": 0, "model": {"name": "cifar:resnet8"},
               "data": {"name": "digits", "image_size": 12, "val_fraction": 0.15, "limit_train": 600},
               "parent": {"recipe": {"epochs": 2, "batch_size": 64}},
               "budget": {"trials": 4, "concurrency": 2}, "finetune": {"epochs": 1, "batch_size": 64},
               "probes": {"size": 32}, "cost": {"latency": False},
               "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
               "ray": {"storage_path": str(work / "ray_results")}, "cache_dir": str(cache_dir)}
        cfg.update(sections)
        return cfg

    return make
