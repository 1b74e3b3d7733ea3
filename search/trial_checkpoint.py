"""A trial's Ray Tune checkpoint: enough to continue its fine-tune on another node.

One folder: `subnet/` (spec JSON + safetensors weights, as everywhere else), `finetune_state.pt`
(optimiser, schedule and data-order state: tensors and numbers only, read back with
`torch.load(weights_only=True)`) and `trial.json` (the MLflow run to keep logging to and the
metrics already reported). Nothing in it is unpickled: a checkpoint carrying code is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prunetune.spaces import SubnetSpec, load_subnet, save_subnet

FORMAT = 1
STATE_FILE = "finetune_state.pt"
TRIAL_FILE = "trial.json"
SUBNET_DIR = "subnet"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or read; the message names the file."""


@dataclass
class TrialProgress:
    """What a restored trial needs besides weights: where it logs and what it already reported."""

    mlflow_run_id: str
    epoch: int                          # fine-tune epochs completed
    base: dict                          # cost / CKA metrics reported with every result
    compute_s: float = 0.0
    mlflow_s: float = 0.0
    final: dict | None = None           # the last report, once the trial has finished
    format: int = FORMAT
    last: dict = field(default_factory=dict)   # the last epoch's report


def write_checkpoint(out: Path, progress: TrialProgress, spec: SubnetSpec, module: torch.nn.Module,
                     state: dict | None) -> Path:
    out = Path(out)
    save_subnet(out / SUBNET_DIR, spec, module)
    if state is not None:
        torch.save(state, out / STATE_FILE)
    return write_progress(out, progress)


def write_progress(out: Path, progress: TrialProgress) -> Path:
    """The checkpoint's `trial.json`; with `out/subnet/` already written, a complete final checkpoint."""
    (Path(out) / TRIAL_FILE).write_text(json.dumps(asdict(progress), indent=1))
    return Path(out)


def read_checkpoint(src: Path) -> tuple[TrialProgress, SubnetSpec, dict[str, torch.Tensor], dict | None]:
    """(progress, spec, weights, fine-tune state or None); raises CheckpointError naming the bad file."""
    src = Path(src)
    trial_file = src / TRIAL_FILE
    try:
        progress = TrialProgress(**json.loads(trial_file.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{trial_file}: not a prunetune trial checkpoint ({err})") from None
    if progress.format != FORMAT:
        raise CheckpointError(f"{trial_file}: checkpoint format {progress.format}, this prunetune reads {FORMAT}")
    try:
        spec, weights = load_subnet(src / SUBNET_DIR)
    except Exception as err:  # noqa: BLE001 - safetensors/pydantic/OS errors all mean the same here
        raise CheckpointError(f"{src / SUBNET_DIR}: unreadable subnet ({type(err).__name__}: {err})") from None
    state = None
    if (src / STATE_FILE).exists():
        try:
            state = torch.load(src / STATE_FILE, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001 - UnpicklingError for payloads, others for garbage
            raise CheckpointError(f"{src / STATE_FILE}: refused, not a tensors-only file "
                                  f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return progress, spec, weights, state
