"""Fixed validation probes and the features CKA compares on them.

Probes are a seeded sample of the validation split (never test), identical for the parent
and every candidate. Features are taken at the end of each stage (global-average-pooled)
and at the penultimate layer (the classifier's input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunetune.trainers.cka import linear_cka
from prunetune.trainers.finetune import resize


@torch.no_grad()
def probe_features(model: nn.Module, x: torch.Tensor, stages: Sequence[str], *, classifier: str,
                   resolution: int | None = None) -> dict[str, torch.Tensor]:
    """{stage name: (n, C) pooled output, "penultimate": (n, D) input of `classifier` (the
    layer that produces the class scores, a conv in SqueezeNet)}."""
    feats: dict[str, torch.Tensor] = {}
    hooks = []

    def save(name):
        def hook(_m, inputs, output):
            feats[name] = output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1)
        return hook

    for name in stages:
        hooks.append(model.get_submodule(name).register_forward_hook(save(name)))
    hooks.append(model.get_submodule(classifier).register_forward_hook(
        lambda _m, inputs, _o: feats.__setitem__("penultimate", inputs[0].flatten(1))))
    try:
        model.eval()
        model(resize(x, resolution))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.cpu() for k, v in feats.items()}


def cka_to_parent(parent_feats: dict[str, torch.Tensor], child_feats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Linear CKA per shared layer plus their mean under the key "mean". A stage whose pooled
    output is the penultimate feature itself (the last stage of a ResNet) is reported but
    counted once in the mean."""
    per_layer = {k: linear_cka(parent_feats[k], child_feats[k]) for k in parent_feats if k in child_feats}
    pen = parent_feats.get("penultimate")
    counted = [v for k, v in per_layer.items()
               if k == "penultimate" or pen is None or parent_feats[k].shape != pen.shape
               or not torch.equal(parent_feats[k], pen)]
    per_layer["mean"] = sum(counted) / max(len(counted), 1)
    return per_layer
