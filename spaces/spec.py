"""A subnet on disk: `subnet.json` (the spec) + `weights.safetensors`.

The spec says how to rebuild the structure from the parent; the weights are plain tensors.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from prunetune.spaces.vector import PruningVector

SPEC_FILE = "subnet.json"
WEIGHTS_FILE = "weights.safetensors"


class SubnetSpec(BaseModel):
    """Parent identity + vector + the structure it resolved to."""

    model_config = ConfigDict(extra="forbid")

    parent_id: str
    parent_hash: str
    vector: PruningVector
    widths: dict[str, int]
    removed_blocks: list[str]
    resolution: int
    in_channels: int
    native_resolution: int
    round_to: int = 1
    importance: str = "l2"      # provenance: which criterion chose the kept channels
    seed: int = 0
    engine: str = "resnet-stages"  # "generic" for spaces.engine, which also records:
    heads: dict[str, int] = {}          # attention module -> heads kept
    groups: dict[str, int] = {}         # channel-group root -> channels kept
    block_criterion: str = "position"
    input_shape: list[int] = []
    input_dtype: str = "float32"
    parent_args: dict[str, int] = {}    # factory keywords used to build the parent (in_channels, num_classes)


def save_subnet(out_dir: Path, spec: SubnetSpec, module: torch.nn.Module) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    (out_dir / SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    return out_dir


def load_subnet(in_dir: Path) -> tuple[SubnetSpec, dict[str, torch.Tensor]]:
    in_dir = Path(in_dir)
    spec = SubnetSpec.model_validate(json.loads((in_dir / SPEC_FILE).read_text()))
    return spec, load_file(str(in_dir / WEIGHTS_FILE))
