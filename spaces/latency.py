"""Wall-clock inference latency of a model, measured the same way for every candidate.

Eval mode, `torch.inference_mode`, a fixed intra-op thread count (restored afterwards, also
on errors), warm-up runs thrown away, then the median of repeated `time.perf_counter`
timings. On CUDA each run is bracketed by `torch.cuda.synchronize` so the timing covers
the kernels, not just their launch. Latency depends only on structure on a given machine,
which `device_label` names (device type plus CPU or GPU model) so caches stay per machine.
"""

from __future__ import annotations

import copy
import functools
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds per forward pass: median and the 10th/90th percentiles of `repeats` runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    threads: int
    device: str


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_label(device: torch.device | str) -> str:
    """A name for the hardware a timing came from, e.g. 'cpu (AMD EPYC 7B13)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({_cpu_name()})"
    return device.type


def _resolve(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(times_ms: list[float]) -> tuple[float, float, float]:
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return deciles[0], statistics.median(times_ms), deciles[-1]


def measure_latency(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 20,
    threads: int = 1,
    device: torch.device | str | None = None,
) -> LatencyStats:
    """Time `model(example_input)`; the batch size is whatever dim 0 of the input holds.

    `device` defaults to the model's; a model elsewhere is timed on a copy moved there, so
    the caller's model is never moved. Its training flag is restored afterwards.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    device = _resolve(device) if device is not None else model_device(model)
    if model_device(model) != device:
        model = copy.deepcopy(model).to(device)
    x = example_input.to(device)
    was_training = model.training
    old_threads = torch.get_num_threads()
    times_ms: list[float] = []
    try:
        torch.set_num_threads(threads)
        model.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                model(x)
                _sync(device)
                times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    p10, median, p90 = _percentiles(times_ms)
    return LatencyStats(median_ms=median, p10_ms=p10, p90_ms=p90, repeats=repeats,
                        threads=threads, device=device_label(device))
