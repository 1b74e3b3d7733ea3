"""What every benchmark report states about where it ran, and where the shared data lives."""

from __future__ import annotations

import os
import platform
from pathlib import Path

# ../shared/data beside the clone, as the tests use it; PRUNETUNE_FASHION_MNIST overrides.
FASHION_MNIST = Path(os.environ.get("PRUNETUNE_FASHION_MNIST")
                     or Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
