"""Architecture-agnostic stages: runs of layers that work at one resolution.

One traced forward pass records, for every conv/linear, how many spatial positions (or
tokens) its output has. Layers in forward order are cut into stages wherever that number
changes; so ResNet's layer1/2/3, MobileNet's resolution segments and Swin's stages come out
without a per-model list, and a ViT is one stage. Layers on pooled 1x1 features in the
middle of the network (squeeze-excitation) belong to the stage around them. A stage is named by the module prefix most
of its layers share (`layer2`), made unique with its resolution when needed (`features@8x8`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

PRUNABLE = (nn.Conv2d, nn.Linear, nn.LSTM)


@dataclass(frozen=True)
class Segment:
    name: str
    positions: int          # spatial positions (H*W) or tokens of the stage's outputs
    layers: tuple[str, ...]  # conv/linear layers in forward order


def _positions(module: nn.Module, out: torch.Tensor, batch: int) -> int:
    """Positions per example; window attention folds windows into dim 0, so divide by the
    input batch, not by the output's first dimension."""
    if isinstance(module, nn.Conv2d) and out.dim() == 4:
        return out.shape[0] * out.shape[2] * out.shape[3] // batch
    if isinstance(module, nn.LSTM):
        channels = module.hidden_size * (2 if module.bidirectional else 1)
    else:
        channels = module.out_features if isinstance(module, nn.Linear) else out.shape[1]
    return max(1, out.numel() // max(1, batch * channels))


@torch.no_grad()
def trace_layers(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, int]]:
    """(name, positions) of every conv/linear, in the order the forward pass first runs them.

    Layers inside an attention module take the positions of the attention's input: window
    attention pads and folds windows, which must not split a stage.
    """
    from prunetune.spaces.heads import find_attention

    batch = example_input.shape[0]
    attention = list(find_attention(model))
    attn_positions: dict[str, int] = {}
    seen: dict[str, int] = {}
    hooks = []

    def owner(name: str) -> str | None:
        return next((a for a in attention if name.startswith(a + ".")), None)

    for name in attention:
        def pre(mod, inputs, name=name):
            x = inputs[0]
            attn_positions[name] = max(1, x.numel() // max(1, batch * x.shape[-1]))
        hooks.append(model.get_submodule(name).register_forward_pre_hook(pre))
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):
            def hook(mod, _inp, out, name=name):
                out = out[0] if isinstance(out, tuple) else out  # LSTM: (output, (h, c))
                if name not in seen and isinstance(out, torch.Tensor):
                    a = owner(name)
                    seen[name] = attn_positions[a] if a in attn_positions else _positions(mod, out, batch)
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        model(example_input)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return list(seen.items())


def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str:
    """The last conv/linear the forward pass runs: its outputs are the classes, never pruned."""
    layers = trace_layers(model, example_input)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no conv or linear layer runs in the forward pass")
    return layers[-1][0]


def _majority_prefix(names: Sequence[str]) -> str:
    """Deepest module prefix shared by more than 2/3 of `names` (a lone layer names itself)."""
    if len(set(names)) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    best = ""
    for depth in range(1, max(len(p) for p in parts)):
        counts = Counter(".".join(p[:depth]) for p in parts if len(p) > depth)
        prefix, n = counts.most_common(1)[0] if counts else ("", 0)
        if 3 * n <= 2 * len(names):
            break
        best = prefix
    return best


def _label(positions: int) -> str:
    side = math.isqrt(positions)
    return f"{side}x{side}" if side * side == positions else f"{positions}"


def segments(layers: Sequence[tuple[str, int]]) -> list[Segment]:
    """Cut forward-ordered (name, positions) into stages of equal resolution."""
    runs: list[tuple[int, list[str]]] = []
    last_spatial = max((i for i, (_, p) in enumerate(layers) if p > 1), default=-1)
    for i, (name, pos) in enumerate(layers):
        if runs and pos == 1 and i < last_spatial:  # squeeze-excitation on pooled features
            runs[-1][1].append(name)
        elif runs and runs[-1][0] == pos:
            runs[-1][1].append(name)
        else:
            runs.append((pos, [name]))
    names = [_majority_prefix(r[1]) or f"stage{i + 1}" for i, r in enumerate(runs)]
    dup = {n for n, c in Counter(names).items() if c > 1}
    names = [f"{n}@{_label(p)}" if n in dup else n for n, (p, _) in zip(names, runs)]
    dup = {n for n, c in Counter(names).items() if c > 1}
    names = [f"{n}.{i + 1}" if n in dup else n for i, n in enumerate(names)]
    return [Segment(n, p, tuple(ls)) for n, (p, ls) in zip(names, runs)]
