"""The parent model: trained once per (model, data, recipe, seed) and cached by content hash,
or loaded from a user checkpoint (a state_dict; `weights_only=True`, never unpickled)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunetune.trainers.data import DataConfig, DataSplits
from prunetune.trainers.finetune import EpochStats, evaluate, fit
from prunetune.trainers.models import build_model
from prunetune.trainers.recipe import TrainRecipe


@dataclass(frozen=True)
class ParentInfo:
    parent_id: str          # content hash of (model, data, recipe, seed) or of the checkpoint file
    val_acc: float
    test_acc: float
    source: str             # "cache", "trained" or the checkpoint path


def cache_key(model_name: str, data: DataConfig, recipe: TrainRecipe, seed: int) -> str:
    blob = json.dumps({"model": model_name, "data": data.model_dump(mode="json"),
                       "recipe": recipe.model_dump(mode="json"), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read weights from .safetensors or a torch state_dict file, without unpickling objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    return state


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def get_parent(model_name: str, data: DataConfig, splits: DataSplits, recipe: TrainRecipe, *,
               seed: int, cache_dir: Path, checkpoint: Path | None = None,
               device: torch.device = torch.device("cpu"),
               on_epoch: Callable[[EpochStats], None] | None = None) -> tuple[nn.Module, ParentInfo]:
    """Return the trained parent (on CPU, eval mode) and where it came from."""
    model = build_model(model_name, in_channels=splits.in_channels, num_classes=splits.num_classes)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint))
        val_acc, _ = evaluate(model, splits.val, device=torch.device("cpu"))
        test_acc, _ = evaluate(model, splits.test, device=torch.device("cpu"))
        return model.eval(), ParentInfo(_file_hash(checkpoint), val_acc, test_acc, str(checkpoint))

    key = cache_key(model_name, data, recipe, seed)
    entry = Path(cache_dir) / "parents" / key
    if (entry / "weights.safetensors").exists() and (entry / "meta.json").exists():
        model.load_state_dict(load_file(str(entry / "weights.safetensors")))
        meta = json.loads((entry / "meta.json").read_text())
        return model.eval(), ParentInfo(key, meta["val_acc"], meta["test_acc"], "cache")

    torch.manual_seed(seed)
    model = build_model(model_name, in_channels=splits.in_channels, num_classes=splits.num_classes)
    history = fit(model, splits.train, splits.val, recipe, device=device, seed=seed, on_epoch=on_epoch)
    model.cpu().eval()
    val_acc = history[-1].val_acc if history else evaluate(model, splits.val, device=torch.device("cpu"))[0]
    test_acc, _ = evaluate(model, splits.test, device=torch.device("cpu"))
    _write_entry(entry, model, {"val_acc": val_acc, "test_acc": test_acc, "model": model_name,
                                "recipe": recipe.model_dump(mode="json"), "seed": seed})
    return model, ParentInfo(key, val_acc, test_acc, "trained")


def _write_entry(entry: Path, model: nn.Module, meta: dict) -> None:
    """Write to a temp dir and rename, so a crash never leaves a half-written cache entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".tmp-"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process won the race; its entry is equivalent
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
