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
