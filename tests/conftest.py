"""Shared fixtures: real data from ../shared, and a writable cache per test session.

Ray must bind to loopback: the switch has to be set before `ray` is first imported.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FASHION_MNIST = Path(os.environ.get("PRUNETUNE_FASHION_MNIST")
                     or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fashion-mnist")


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    """The read-only Fashion-MNIST copy in ../shared next to the repository (never written)."""
    if not (FASHION_MNIST / "FashionMNIST" / "raw").is_dir():
        pytest.fail(f"Fashion-MNIST not found at {FASHION_MNIST}: the tests need ../shared/data beside the "
                    "clone, or PRUNETUNE_FASHION_MNIST pointing at a folder holding FashionMNIST/raw")
    return FASHION_MNIST


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One writable cache (dataset copies, parents) for the whole test session."""
    return tmp_path_factory.mktemp("prunetune-cache")
