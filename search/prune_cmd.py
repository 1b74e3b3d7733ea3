"""`prunetune prune` and `prunetune verify`: one subnet from the command line, exported and checked.

prune: build (or load) a model, apply a vector, write DIR/subnet.json, DIR/weights.safetensors,
DIR/model.ts, DIR/model.onnx and DIR/cost.json, and print the cost before and after.
verify: rebuild DIR's subnet from its spec and weights and check it against both exports.
"""

from __future__ import annotations

import importlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch import nn

from prunetune.spaces.cost import measure_full_cost
from prunetune.spaces.engine import describe, example_from_spec, prune, rebuild
from prunetune.spaces.export import FILE_NAMES, ONNX, TORCHSCRIPT, check_parity, export_all, parity_inputs
from prunetune.spaces.common import PruningError
from prunetune.spaces.spec import load_subnet, save_subnet
from prunetune.spaces.vector import PruningVector
from prunetune.trainers.models import build_model, is_known_model
from prunetune.trainers.parent import load_state_dict
from prunetune.trainers.zoo import ARCHS


class BadInput(ValueError):
    """Input the user can fix; the CLI prints it and exits 2."""


def build_parent(model: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """`cifar:resnet56`, `torchvision:NAME`, a registered zoo name, or a `module:function` factory."""
    if is_known_model(model):
        return build_model(model, in_channels=in_channels, num_classes=num_classes)
    if model in ARCHS:
        return ARCHS[model].build()
    mod_name, _, fn_name = model.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError, ValueError):
        raise BadInput(f"MODEL {model!r}: not a registered model (cifar:..., torchvision:...) nor an "
                       "importable module:function factory") from None
    try:
        net = factory(in_channels=in_channels, num_classes=num_classes)
    except TypeError:
        net = factory()
    if not isinstance(net, nn.Module):
        raise BadInput(f"MODEL {model!r}: the factory returned {type(net).__name__}, not an nn.Module")
    return net


def _example(model: str, input_size: int | None, in_channels: int) -> torch.Tensor:
    if model in ARCHS and input_size is None:
        return ARCHS[model].example_input()
    size = input_size or (32 if model.startswith("cifar:") else 224)
    return torch.randn(1, in_channels, size, size, generator=torch.Generator().manual_seed(0))


def _vector(args, structure) -> PruningVector:
    if args.vector:
        path = Path(args.vector)
        if not path.is_file():
            raise BadInput(f"--vector {path}: file not found")
        try:
            return PruningVector.model_validate(yaml.safe_load(path.read_text()))
        except Exception as err:  # noqa: BLE001 - pydantic/yaml errors both become one message
            raise BadInput(f"--vector {path}: {err}") from None
    ratio = args.channel_ratio
    if ratio is not None and not 0 < ratio <= 1:
        raise BadInput(f"--channel-ratio: must be in (0, 1], got {ratio}")
    if ratio is not None and not any(s.groups for s in structure.channel_stages):
        raise BadInput(f"--channel-ratio: {args.model} has no channel group the engine can prune"
                       + (f" (the dependency graph failed: {structure.channel_error})" if structure.channel_error else ""))
    if args.head_ratio is not None and not structure.attention:
        raise BadInput(f"--head-ratio: {args.model} has no attention module")
    if args.drop_blocks and not structure.depth_stages:
        raise BadInput(f"--drop-blocks: {args.model} has no removable residual block")
    return PruningVector(
        channels={s.name: ratio for s in structure.channel_stages if s.groups} if ratio else {},
        heads={s.name: args.head_ratio for s in structure.channel_stages if s.attention} if args.head_ratio else {},
        depth={s.name: max(s.min_depth, s.max_depth - args.drop_blocks) for s in structure.depth_stages}
        if args.drop_blocks else {},
        resolution=args.resolution,
    )


def cost_table(before, after) -> Table:
    table = Table(title="cost (batch 1 latency on this machine, 1 thread)")
    for col in ("", "MACs", "params", "peak act.", "latency ms", f"latency ms (batch {after.batch})"):
        table.add_column(col, justify="right")

    def row(label, c):
        return (label, f"{c.macs / 1e6:.2f}M", f"{c.params / 1e6:.3f}M",
                f"{(c.peak_activation_bytes or 0) / 2**20:.2f} MiB", f"{c.latency_ms:.2f}", f"{c.latency_ms_batch:.2f}")
    table.add_row(*row("parent", before))
    table.add_row(*row("subnet", after))
    table.add_row("kept", f"{after.macs / before.macs:.1%}", f"{after.params / before.params:.1%}",
                  f"{(after.peak_activation_bytes or 0) / max(1, before.peak_activation_bytes or 1):.1%}",
                  f"{after.latency_ms / before.latency_ms:.1%}", f"{after.latency_ms_batch / before.latency_ms_batch:.1%}")
    return table


def export_table(records) -> Table:
    table = Table(title="exports")
    for col in ("format", "method", "max |diff|", "parity"):
        table.add_column(col)
    for fmt, r in records.items():
        diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.2e}"
        table.add_row(fmt, r.method or "-", diff, "[green]ok[/]" if r.ok else f"[red]FAILED[/] {r.error or ''}")
    return table


def ensure_empty_out(out: Path) -> None:
    """--out must be absent or an empty folder: a command never mixes its files with others."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"--out {out}: exists and is not an empty folder")


def write_subnet_folder(out: Path, spec, module: nn.Module, parent: nn.Module, x: torch.Tensor,
                        xs: torch.Tensor, *, batch: int, repeats: int, console: Console,
                        extra_files: dict[str, str] | None = None):
    """Spec, weights, TorchScript + ONNX (parity-checked), cost.json and `extra_files` into `out`.

    Everything is written to a staging folder first and copied to `out` only once complete, so
    a failure leaves nothing half-written. `x` is the parent's example input, `xs` the subnet's.
    Returns (export records, parent cost, subnet cost).
    """
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        staging = Path(tmp)
        save_subnet(staging, spec, module)
        console.print("exporting TorchScript and ONNX, checking parity ...")
        records = export_all(module, xs, staging)
        before = measure_full_cost(parent, x, batch=batch, repeats=repeats)
        after = measure_full_cost(module, xs, batch=batch, repeats=repeats)
        (staging / "cost.json").write_text(json.dumps({"parent": before.__dict__, "subnet": after.__dict__}, indent=2))
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        shutil.copytree(staging, out)
    return records, before, after


def cmd_prune(args, console: Console) -> int:
    out = Path(args.out)
    ensure_empty_out(out)
    parent = build_parent(args.model, in_channels=args.in_channels, num_classes=args.num_classes).eval()
    if args.checkpoint:
        try:
            parent.load_state_dict(load_state_dict(Path(args.checkpoint)))
        except (OSError, RuntimeError, ValueError) as err:
            raise BadInput(f"--checkpoint {args.checkpoint}: {err}") from None
    x = _example(args.model, args.input_size, args.in_channels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structure = describe(parent, x)
        vector = _vector(args, structure)
        console.print(f"{args.model}: channel stages {[s.name for s in structure.channel_stages]}, "
                      f"depth stages {[s.name for s in structure.depth_stages]}, "
                      f"attention modules {len(structure.attention)}", highlight=False)
        if structure.skipped_groups:
            console.print(f"[yellow]not pruned[/]: {len(structure.skipped_groups)} channel groups "
                          f"(grouped convs, or coupled to a transformer's hidden width), e.g. "
                          f"{', '.join(structure.skipped_groups[:3])}", highlight=False)
        probes = (torch.randn(16, *x.shape[1:], generator=torch.Generator().manual_seed(0))
                  if x.is_floating_point() else x.repeat(16, *[1] * (x.dim() - 1)))
        pruned = prune(parent, vector, x, model_name=args.model, importance=args.importance,
                       round_to=args.round_to, block_criterion=args.block_criterion, structure=structure,
                       probes=probes)
    spec = pruned.spec.model_copy(update={"parent_args": {"in_channels": args.in_channels,
                                                          "num_classes": args.num_classes}})
    xs = x if vector.resolution is None else torch.randn(1, x.shape[1], vector.resolution, vector.resolution)
    records, before, after = write_subnet_folder(out, spec, pruned.module, parent, x, xs, batch=args.batch,
                                                 repeats=args.repeats, console=console)
    console.print(cost_table(before, after))
    console.print(export_table(records))
    console.print(f"wrote {out}/: subnet.json, weights.safetensors, model.ts, model.onnx, cost.json")
    return 0 if all(r.ok for r in records.values()) else 1


def cmd_verify(args, console: Console) -> int:
    d = Path(args.dir)
    if not (d / "subnet.json").is_file():
        raise BadInput(f"{d}: no subnet.json (not a `prunetune prune` output folder)")
    spec, weights = load_subnet(d)
    skeleton = build_parent(spec.parent_id, in_channels=spec.parent_args.get("in_channels", 3),
                            num_classes=spec.parent_args.get("num_classes", 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = rebuild(skeleton, spec)
    model.load_state_dict(weights, strict=True)
    x = example_from_spec(spec)
    if spec.vector.resolution is not None and x.dim() == 4:
        x = torch.zeros(1, x.shape[1], spec.vector.resolution, spec.vector.resolution)
    inputs = parity_inputs(x)
    ok = True
    table = Table(title=f"verify {d}")
    for col in ("artifact", "max |diff| vs rebuilt subnet", "result"):
        table.add_column(col)
    for fmt in (TORCHSCRIPT, ONNX):
        path = d / FILE_NAMES[fmt]
        if not path.is_file():
            table.add_row(fmt, "-", "[red]missing[/]")
            ok = False
            continue
        try:
            res = check_parity(model, path, fmt, inputs)
            table.add_row(fmt, f"{res.max_abs_diff:.2e}", "[green]ok[/]" if res.ok else "[red]MISMATCH[/]")
            ok &= res.ok
        except Exception as err:  # noqa: BLE001 - report and fail, never crash
            table.add_row(fmt, "-", f"[red]error[/] {err}")
            ok = False
    console.print(table)
    console.print("[green]all artifacts agree with the rebuilt subnet[/]" if ok else "[red]verification failed[/]")
    return 0 if ok else 1


def run(args, console: Console, handler) -> int:
    try:
        return handler(args, console)
    except (BadInput, PruningError) as err:
        console.print(f"[red]error[/] {err}", highlight=False)
        return 2
