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


def train_epochs(model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
                 device: torch.device, resolution: int | None = None, seed: int = 0,
                 teacher: nn.Module | None = None, distill: DistillConfig | None = None,
                 after_backward: Callable[[nn.Module], None] | None = None,
                 after_step: Callable[[nn.Module], None] | None = None) -> Iterator[EpochStats]:
    """SGD + cosine annealing (per step, over all epochs), yielding stats after each epoch.

    A generator so callers can report or stop between epochs without restarting the optimiser.
    With a `teacher` and `distill.weight > 0` the loss mixes in knowledge distillation; the
    teacher sees each batch at its native resolution. Policies hook in after the backward pass
    (`after_backward`: a sparsity regulariser edits the gradients) and after the optimiser step
    (`after_step`: pruning masks are re-applied).
    """
    use_teacher = teacher is not None and distill is not None and distill.weight > 0
    if use_teacher:
        teacher = teacher.to(device).eval()
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay,
                          nesterov=recipe.nesterov and recipe.momentum > 0)
    loader = make_loader(train, batch_size=recipe.batch_size, shuffle=True, seed=seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, recipe.epochs * len(loader)))
    for epoch in range(1, recipe.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                teacher_logits = teacher(x) if use_teacher else None
            loss = distilled_loss(model(resize(x, resolution)), y, teacher_logits, distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            opt.step()
            if after_step is not None:
                after_step(model)
            sched.step()
            total += loss.item() * y.numel()
            n += y.numel()
        val_acc, val_loss = evaluate(model, val, device=device, resolution=resolution)
        yield EpochStats(epoch, total / max(n, 1), val_acc, val_loss, time.perf_counter() - t0)


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
