"""One embedded Ray for every search test of the session (loopback only, 2 CPUs)."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    from prunetune.cluster.connect import connect, disconnect

    connect(None, num_cpus=2)
    yield
    disconnect()
