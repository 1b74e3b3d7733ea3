"""Training and evaluation loops shared by the parent and every candidate."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from prunetune.trainers.data import make_loader
from prunetune.trainers.distill import DistillConfig, distilled_loss
from prunetune.trainers.recipe import TrainRecipe


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_acc: float
    val_loss: float
    seconds: float


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Feed a batch at the subnet's input resolution (the resolution dimension of the vector)."""
    if resolution is None or x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=resolution < x.shape[-1])


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, *, device: torch.device,
             resolution: int | None = None, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` on `data`."""
    loader = data if isinstance(data, DataLoader) else make_loader(data, batch_size=batch_size, shuffle=False)
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in loader:
        x, y = resize(x.to(device), resolution), y.to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += y.numel()
    return correct / max(n, 1), loss / max(n, 1)


class Trainer:
    """SGD + cosine annealing (per step, over all epochs) with explicit, resumable state.

    `epochs()` yields stats after each epoch, so callers can report, checkpoint or stop between
    epochs without restarting the optimiser; `state_dict()` after an epoch and
    `load_state_dict()` on a fresh Trainer (same model weights restored by the caller) continue
    the run exactly: optimiser momentum, learning-rate step and the data order. The state holds
    tensors and numbers only, so it round-trips through `torch.load(..., weights_only=True)`.

    With a `teacher` and `distill.weight > 0` the loss mixes in knowledge distillation; the
    teacher sees each batch at its native resolution. Policies hook in after the backward pass
    (`after_backward`: a sparsity regulariser edits the gradients) and after the optimiser step
    (`after_step`: pruning masks are re-applied).
    """

    def __init__(self, model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
                 device: torch.device, resolution: int | None = None, seed: int = 0,
                 teacher: nn.Module | None = None, distill: DistillConfig | None = None,
                 after_backward: Callable[[nn.Module], None] | None = None,
                 after_step: Callable[[nn.Module], None] | None = None):
        self.model, self.val, self.recipe = model.to(device), val, recipe
        self.device, self.resolution = device, resolution
        self.after_backward, self.after_step = after_backward, after_step
        self.use_teacher = teacher is not None and distill is not None and distill.weight > 0
        self.teacher = teacher.to(device).eval() if self.use_teacher else None
        self.distill = distill
        self.opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                   weight_decay=recipe.weight_decay,
                                   nesterov=recipe.nesterov and recipe.momentum > 0)
        self.loader = make_loader(train, batch_size=recipe.batch_size, shuffle=True, seed=seed)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.opt, T_max=max(1, recipe.epochs * len(self.loader)))
        self.epoch = 0   # epochs completed

    def state_dict(self) -> dict:
        gen = self.loader.generator
        return {"epoch": self.epoch, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "generator": gen.get_state() if gen is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("generator") is not None and self.loader.generator is not None:
            self.loader.generator.set_state(state["generator"])
        self.epoch = int(state["epoch"])

    def epochs(self) -> Iterator[EpochStats]:
        """The remaining epochs of the recipe (all of them on a fresh Trainer)."""
        model, device, resolution = self.model, self.device, self.resolution
        while self.epoch < self.recipe.epochs:
            t0 = time.perf_counter()
            model.train()
            total, n = 0.0, 0
            for x, y in self.loader:
                x, y = x.to(device), y.to(device)
                with torch.no_grad():
                    teacher_logits = self.teacher(x) if self.use_teacher else None
                loss = distilled_loss(model(resize(x, resolution)), y, teacher_logits, self.distill)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.after_backward is not None:
                    self.after_backward(model)
                self.opt.step()
                if self.after_step is not None:
                    self.after_step(model)
                self.sched.step()
                total += loss.item() * y.numel()
                n += y.numel()
            self.epoch += 1
            val_acc, val_loss = evaluate(model, self.val, device=device, resolution=resolution)
            yield EpochStats(self.epoch, total / max(n, 1), val_acc, val_loss, time.perf_counter() - t0)


def train_epochs(model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
                 device: torch.device, resolution: int | None = None, seed: int = 0,
                 teacher: nn.Module | None = None, distill: DistillConfig | None = None,
                 after_backward: Callable[[nn.Module], None] | None = None,
                 after_step: Callable[[nn.Module], None] | None = None) -> Iterator[EpochStats]:
    """All epochs of `recipe` on a fresh `Trainer` (see there), stats after each."""
    yield from Trainer(model, train, val, recipe, device=device, resolution=resolution, seed=seed,
                       teacher=teacher, distill=distill, after_backward=after_backward,
                       after_step=after_step).epochs()


def fit(model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
        device: torch.device, resolution: int | None = None, seed: int = 0,
        on_epoch: Callable[[EpochStats], None] | None = None) -> list[EpochStats]:
    """Train all epochs of `recipe`; `on_epoch` sees each epoch's stats (progress output)."""
    history = []
    for stats in train_epochs(model, train, val, recipe, device=device, resolution=resolution, seed=seed):
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    return history
