"""Channel importance criteria, selectable by name.

Each entry builds a torch-pruning importance that scores every channel of a DepGraph group
(all coupled parameter slices together). Register a new criterion with
`@register_importance("name")` and the registry-driven tests cover it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch_pruning as tp

IMPORTANCES: dict[str, Callable[[], object]] = {}
NEEDS_GRAD: set[str] = set()  # criteria that read parameter gradients


def register_importance(name: str, *, needs_grad: bool = False):
    def deco(factory):
        IMPORTANCES[name] = factory
        if needs_grad:
            NEEDS_GRAD.add(name)
        return factory
    return deco


def get_importance(name: str):
    try:
        return IMPORTANCES[name]()
    except KeyError:
        raise KeyError(f"unknown importance {name!r}; known: {sorted(IMPORTANCES)}") from None


@register_importance("l1")
def _l1():
    return tp.importance.GroupMagnitudeImportance(p=1)


@register_importance("l2")
def _l2():
    return tp.importance.GroupMagnitudeImportance(p=2)


@register_importance("group_l2")
def _group_l2():
    """Squared L2 norm of each channel over every coupled slice, not normalised: comparable
    across groups (the DepGraph group norm, squared; SAP's structured mode uses it)."""
    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="sum", normalizer=None)


@register_importance("bn_scale")
def _bn_scale():
    return tp.importance.BNScaleImportance()


@register_importance("random")
def _random():
    return tp.importance.RandomImportance()


@register_importance("taylor", needs_grad=True)
def _taylor():
    """First-order Taylor (|w * dL/dw| over the group); the engine fills the gradients."""
    return tp.importance.GroupTaylorImportance()
