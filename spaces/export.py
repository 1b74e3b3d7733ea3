"""Export a model to TorchScript and ONNX, and prove each artifact computes what the model does.

TorchScript: `torch.jit.script` first, because it keeps control flow; `torch.jit.trace`
(with check_trace) only when scripting fails, since a trace freezes data-dependent branches.

ONNX: the dynamo exporter (`torch.onnx.export(dynamo=True)`, needs `onnxscript`) first, the
TorchScript-based one (`dynamo=False`, method "torchscript-onnx") only when dynamo raises, e.g.
on data-dependent control flow. With torch 2.14 both export resnet18, mobilenet_v3_small,
efficientnet_b0, convnext_tiny, a small ViT, a small Swin, CIFAR ResNet-20 and an LSTM
classifier, at the same parity (< 5e-6 on O(1) logits); dynamo leads because the other is
deprecated and slated for removal, though it exports 2-3x slower (2-7 s for those on 2 cores).
The batch axis is dynamic (it held for all of those; torch.export names it, e.g. "s77"); an
example with batch 1 is repeated to batch 2 for the export, since torch.export specializes
size-1 dimensions. Weights live inside model.onnx unless they pass protobuf's 2 GiB limit
(then beside it, in model.onnx.data).

Parity runs the model and the reloaded artifact on inputs other than the export example, one
at the example's batch size and one at another, so constants baked in by a trace and a batch
axis that is not really dynamic both show up as failures. The tolerance is absolute: it means
most on logits of order 1 (fp32 noise grows with their scale).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

TORCHSCRIPT = "torchscript"
ONNX = "onnx"
FILE_NAMES = {TORCHSCRIPT: "model.ts", ONNX: "model.onnx"}

_PROTOBUF_LIMIT = 2**31 - 2**26      # stay clear of 2 GiB: the graph itself needs room too
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(RuntimeError):
    """An artifact that could not be written or run; the message names the format and model."""


@dataclass(frozen=True)
class ParityResult:
    format: str
    max_abs_diff: float
    ok: bool


@dataclass(frozen=True)
class ExportRecord:
    """One format's outcome. `ok` is True only once a parity check has passed."""

    format: str
    path: Path | None
    method: str | None           # script / trace / dynamo / torchscript-onnx
    max_abs_diff: float | None = None
    ok: bool = False
    error: str | None = None


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: Path) -> ExportRecord:
    """Script the model (trace it if scripting fails) and save it with torch.jit.save."""
    path = _fresh(path)
    with _eval_mode(model):
        try:
            artifact = torch.jit.script(model)
            with torch.no_grad():
                # compiling is not running: some failures wait. Scripting may also take other
                # branches (torchvision's GoogLeNet returns a tuple with None aux outputs).
                _same_structure(artifact(example_input), model(example_input))
            method = "script"
        except Exception as script_err:
            try:
                with torch.no_grad():
                    artifact = torch.jit.trace(model, example_input, check_trace=True)
                method = "trace"
            except Exception as trace_err:
                raise ExportError(
                    f"{TORCHSCRIPT} export of {_name(model)} failed: "
                    f"script: {_describe(script_err)}; trace: {_describe(trace_err)}"
                ) from trace_err
    torch.jit.save(artifact, str(path))
    return ExportRecord(TORCHSCRIPT, path, method)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: Path, *,
                opset: int | None = None) -> ExportRecord:
    """Export with a dynamic batch axis (dynamo, else the TorchScript-based exporter) and
    validate the file with onnx.checker."""
    path = _fresh(path)
    x = example_input if example_input.shape[0] > 1 else example_input.repeat_interleave(2, 0)
    errors = []
    with _eval_mode(model):
        for method, export in (("dynamo", _onnx_dynamo), ("torchscript-onnx", _onnx_legacy)):
            try:
                export(model, x, path, opset)
                onnx.checker.check_model(str(path))
                return ExportRecord(ONNX, path, method)
            except Exception as err:
                errors.append(f"{method}: {_describe(err)}")
    _fresh(path)
    raise ExportError(f"{ONNX} export of {_name(model)} failed: " + "; ".join(errors))


def parity_inputs(example_input: torch.Tensor, *, seed: int = 0) -> list[torch.Tensor]:
    """Two random inputs shaped like the example, at its batch size and at another one.

    Integer inputs (token ids) stay within the example's value range, so embeddings are
    never indexed out of bounds.
    """
    g = torch.Generator().manual_seed(seed)
    batch = example_input.shape[0]
    out = []
    for b in (batch, 1 if batch > 1 else 2):
        shape = (b, *example_input.shape[1:])
        if example_input.dtype == torch.bool:
            x = torch.randint(0, 2, shape, generator=g).bool()
        elif example_input.is_floating_point():
            x = torch.randn(shape, generator=g, dtype=example_input.dtype)
        else:
            lo, hi = int(example_input.min()), int(example_input.max())
            x = torch.randint(lo, hi + 1, shape, generator=g, dtype=example_input.dtype)
        out.append(x.to(example_input.device))
    return out


def check_parity(model: nn.Module, artifact_path: Path, fmt: str,
                 example_inputs: Sequence[torch.Tensor], *, atol: float = 1e-4) -> ParityResult:
    """Largest |model - artifact| over all outputs and inputs, in fp32 on CPU.

    A mismatch in the number or shapes of outputs, or a non-finite difference, fails.
    """
    run = _runner(fmt, Path(artifact_path), model)
    worst = 0.0
    with _eval_mode(model), torch.no_grad():
        for x in example_inputs:
            try:
                expected = _tensors(model(x))
            except Exception as err:
                raise ExportError(f"{fmt} parity: {_name(model)} itself failed on input "
                                  f"{tuple(x.shape)}: {_describe(err)}") from err
            try:
                got = run(x)
            except Exception as err:
                raise ExportError(f"{fmt} artifact of {_name(model)} at {artifact_path} failed "
                                  f"on input {tuple(x.shape)}: {_describe(err)}") from err
            if [e.shape for e in expected] != [g.shape for g in got]:
                return ParityResult(fmt, math.inf, False)
            for e, g in zip(expected, got):
                e, g = e.detach().cpu().float().double(), g.detach().cpu().float().double()
                diff = (e - g).abs().max().item() if e.numel() else 0.0
                if not math.isfinite(diff):
                    return ParityResult(fmt, math.nan, False)
                worst = max(worst, diff)
    return ParityResult(fmt, worst, worst <= atol)


def export_all(model: nn.Module, example_input: torch.Tensor, out_dir: Path, *,
               atol: float = 1e-4) -> dict[str, ExportRecord]:
    """Write out_dir/model.ts and out_dir/model.onnx and check each against the model.

    Never raises for a failing format: its record carries ok=False and an `error`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = parity_inputs(example_input)
    exporters = {TORCHSCRIPT: export_torchscript, ONNX: export_onnx}
    records: dict[str, ExportRecord] = {}
    for fmt, export in exporters.items():
        record = ExportRecord(fmt, None, None)
        try:
            record = export(model, example_input, out_dir / FILE_NAMES[fmt])
            parity = check_parity(model, record.path, fmt, inputs, atol=atol)
            error = None if parity.ok else (
                f"{fmt} artifact of {_name(model)} ({record.method}) differs from the model: "
                f"max |diff| {parity.max_abs_diff:.3g} > atol {atol:g}")
            records[fmt] = replace(record, max_abs_diff=parity.max_abs_diff, ok=parity.ok,
                                   error=error)
        except Exception as err:        # one failing format must not hide the other's outcome
            message = str(err) if isinstance(err, ExportError) else (
                f"{fmt} export of {_name(model)} failed: {_describe(err)}")
            records[fmt] = replace(record, error=message)
    return records


def _onnx_dynamo(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    dynamic = torch.export.ShapesCollection()   # keyed by tensor: any forward signature works
    dynamic[x] = {0: torch.export.Dim("batch")}
    torch.onnx.export(
        model, (x,), str(path), dynamo=True, opset_version=opset, verbose=False,
        input_names=["input"], dynamic_shapes=dynamic,
        external_data=_state_bytes(model) > _PROTOBUF_LIMIT,
    )


def _onnx_legacy(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None) -> None:
    torch.onnx.export(
        model, (x,), str(path), dynamo=False, opset_version=opset,
        input_names=["input"], dynamic_axes={"input": {0: "batch"}},
    )


def _runner(fmt: str, path: Path, model: nn.Module):
    """Load an artifact once; return input -> list of output tensors."""
    if fmt == TORCHSCRIPT:
        module = torch.jit.load(str(path), map_location="cpu").eval()
        return lambda x: _tensors(module(x.cpu()))
    if fmt == ONNX:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != 1:
            raise ExportError(f"{ONNX} artifact of {_name(model)} at {path} takes "
                              f"{len(names)} inputs {names}, expected one")
        return lambda x: [torch.from_numpy(o)
                          for o in session.run(None, {names[0]: x.detach().cpu().numpy()})]
    raise ValueError(f"unknown export format {fmt!r}; known: {sorted(FILE_NAMES)}")


def _same_structure(got, expected) -> None:
    """Raise when a scripted module's outputs are not the eager module's tensors."""
    shapes = [t.shape for t in _tensors(expected)]
    if [t.shape for t in _tensors(got)] != shapes:
        raise ExportError(f"scripted outputs differ in structure from eager outputs {shapes}")


def _tensors(out) -> list[torch.Tensor]:
    """Outputs as a flat list (tensor, tuple/list, dict values in order), as ONNX sees them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    raise TypeError(f"cannot compare a model output of type {type(out).__name__}")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _fresh(path: Path) -> Path:
    """Remove an earlier artifact (and ONNX sidecar), so a failed export leaves none behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    return path


def _state_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _describe(err: BaseException) -> str:
    """The root cause's type and message on one line, without terminal colours, capped."""
    while err.__cause__ is not None:
        err = err.__cause__
    message = " ".join(_ANSI.sub("", str(err)).split())
    return f"{type(err).__name__}: {message}"[:300]


def _name(model: nn.Module) -> str:
    return type(model).__name__
