"""What a subnet costs: MACs, parameters, peak activation memory and latency.

`measure_cost` gives MACs and parameters (torch-pruning's counter) for an image size or any
example input; `peak_activation_bytes` estimates inference working memory; and
`measure_full_cost` fills every field of `Cost` for one candidate, latency included, going
through a `CostCache` when given so that equal structures are measured once per machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from prunetune.spaces.cost_cache import CostCache, latency_key, static_key, structural_signature
from prunetune.spaces.latency import LatencyStats, device_label, measure_latency, model_device


class CostConfig(BaseModel):
    """What a search measures for every candidate besides MACs and params."""

    model_config = ConfigDict(extra="forbid")

    latency: bool = Field(default=True, description="time each candidate (median after warm-up)")
    batch: int = Field(default=8, ge=1, description="batch size of the second latency measurement")
    repeats: int = Field(default=10, ge=1, description="timed runs per latency measurement")
    threads: int = Field(default=1, ge=1, description="torch threads while timing")


@dataclass(frozen=True)
class Cost:
    """Costs of one network at one input. Latencies are medians in ms (`latency_ms` at batch
    1, `latency_ms_batch` at `batch`), timed on `device` with `threads` intra-op threads."""

    macs: int
    params: int
    peak_activation_bytes: int | None = None
    latency_ms: float | None = None
    latency_ms_batch: float | None = None
    batch: int | None = None
    device: str | None = None
    threads: int | None = None


def measure_cost(
    model: nn.Module,
    *,
    in_channels: int | None = None,
    resolution: int | None = None,
    example_input: torch.Tensor | None = None,
) -> Cost:
    """MACs and params for one input (conv/linear/rnn..., as torch-pruning counts them).

    Give `in_channels` and `resolution` for one square image, or `example_input` for anything
    else (e.g. a (1, seq_len) tensor of token ids). The model itself is not changed.
    Attention is counted through prunetune's equivalent attention modules (all heads kept):
    torchvision's Swin computes its projections functionally, which the counter cannot see,
    so parent and pruned subnet would otherwise be counted differently. The attention
    matmuls themselves (QK^T, AV) are counted by neither.
    """
    if example_input is None:
        if in_channels is None or resolution is None:
            raise ValueError("measure_cost needs in_channels and resolution, or example_input")
        example_input = torch.zeros(1, in_channels, resolution, resolution)
    elif in_channels is not None or resolution is not None:
        raise ValueError("measure_cost takes example_input or in_channels/resolution, not both")
    from prunetune.spaces.heads import find_attention, prune_heads

    counted = prune_heads(model, 1.0) if find_attention(model) else model
    macs, params = tp.utils.count_ops_and_params(counted, example_input.to(model_device(model)))
    return Cost(macs=int(macs), params=int(params))


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _working_set_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of distinct memory: tensors sharing storage (views, in-place results) count once."""
    largest: dict[int, int] = {}
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        largest[ptr] = max(largest.get(ptr, 0), t.nbytes)
    return sum(largest.values())


def peak_activation_bytes(model: nn.Module, example_input: torch.Tensor) -> int:
    """Per-layer working-set peak of one inference forward at `example_input` (MCUNet-style).

    Definition: the maximum, over every call of every leaf module (a module without
    children), of the bytes of its input tensors plus its output tensors, where tensors that
    share storage (views such as Flatten, in-place ops such as ReLU(inplace=True)) are counted
    once, at the largest size seen. Weights, functional ops written in a `forward` (e.g. a
    residual `+=`) and tensors kept alive across layers (skip connections) are not counted,
    so this is a lower bound on real peak memory that ranks candidates consistently. A model
    that calls no leaf module is measured as one layer. On CUDA the result is the larger of
    this and `torch.cuda.max_memory_allocated` growth during the forward.
    """
    device = model_device(model)
    x = example_input.to(device)
    per_call: list[int] = []
    whole_model: list[int] = []

    def record(into: list[int]) -> Callable:
        def hook(_module, args, kwargs, output):
            into.append(_working_set_bytes(_tensors([args, kwargs, output])))
        return hook

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(record(per_call), with_kwargs=True) for m in leaves]
    handles.append(model.register_forward_hook(record(whole_model), with_kwargs=True))
    was_training = model.training
    allocator_peak = 0
    try:
        model.eval()
        with torch.inference_mode():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                baseline = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                allocator_peak = torch.cuda.max_memory_allocated(device) - baseline
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return max(max(per_call or whole_model), allocator_peak)


_STATIC_FIELDS = ("macs", "params", "peak_activation_bytes")
_LATENCY_FIELDS = tuple(f.name for f in fields(LatencyStats))


def _static_cost(model: nn.Module, example_input: torch.Tensor) -> dict:
    cost = measure_cost(model, example_input=example_input)
    return {"macs": cost.macs, "params": cost.params,
            "peak_activation_bytes": peak_activation_bytes(model, example_input)}


def _cached(cache: CostCache | None, signature: str, key: str, names: tuple[str, ...],
            measure: Callable[[], dict]) -> dict:
    """The entry under `key` when it has every field in `names`, else `measure()` stored."""
    if cache is not None:
        hit = cache.get(signature, key)
        if hit is not None and all(n in hit for n in names):
            return {n: hit[n] for n in names}
    value = measure()
    if cache is not None:
        cache.put(signature, key, value)
    return value


def measure_full_cost(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    batch: int = 8,
    latency: bool = True,
    cache: CostCache | None = None,
    threads: int = 1,
    warmup: int = 5,
    repeats: int = 20,
) -> Cost:
    """Every field of `Cost` for `model` at `example_input`, a batch of one sample.

    The batch latency feeds `batch` copies of the example stacked along dim 0. With `cache`,
    static costs are keyed by structure and device, latencies by structure, device, threads
    and batch; a cached latency is reused whatever `warmup`/`repeats` it was taken with.
    """
    if example_input.dim() == 0 or example_input.shape[0] != 1:
        raise ValueError(f"example_input must hold one sample (dim 0 of size 1), "
                         f"got shape {tuple(example_input.shape)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = model_device(model)
    label = device_label(device)
    signature = structural_signature(model, example_input) if cache is not None else ""
    static = _cached(cache, signature, static_key(label), _STATIC_FIELDS,
                     lambda: _static_cost(model, example_input))
    cost = Cost(macs=int(static["macs"]), params=int(static["params"]),
                peak_activation_bytes=int(static["peak_activation_bytes"]), device=label)
    if not latency:
        return cost

    def timed(b: int) -> dict:
        x = example_input.repeat(b, *([1] * (example_input.dim() - 1)))
        return _cached(cache, signature, latency_key(label, threads, b), _LATENCY_FIELDS,
                       lambda: asdict(measure_latency(model, x, warmup=warmup, repeats=repeats,
                                                      threads=threads, device=device)))

    one = timed(1)
    many = one if batch == 1 else timed(batch)
    return replace(cost, latency_ms=float(one["median_ms"]),
                   latency_ms_batch=float(many["median_ms"]), batch=batch, threads=threads)
