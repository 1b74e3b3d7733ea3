"""Pareto dominance, ranking and 2-D hypervolume for multi-objective search results.

Pure math on plain numbers so it can be used from trainers, reports and tests alike.
Internally every objective is turned into minimisation by negating "max" ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

MODES = ("max", "min")


@dataclass(frozen=True)
class Objective:
    """One optimisation target: a metric key of a trial record and its direction."""

    metric: str
    mode: Literal["max", "min"]

    def __post_init__(self) -> None:
        _check_modes([self.mode])


def _check_modes(modes: Sequence[str]) -> None:
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"mode must be one of {MODES}, got {bad}")


def _minimised(point: Sequence[Any], modes: Sequence[str]) -> list[float]:
    """The point as floats in minimisation form; NaN for a missing (None) value."""
    if len(point) != len(modes):
        raise ValueError(f"point has {len(point)} values but there are {len(modes)} modes")
    return [
        math.nan if v is None else (-float(v) if m == "max" else float(v))
        for v, m in zip(point, modes)
    ]


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """True if `a` is no worse than `b` in every objective and strictly better in one.

    A point with a NaN or None value is incomparable: it neither dominates nor is dominated.
    """
    _check_modes(modes)
    x, y = _minimised(a, modes), _minimised(b, modes)
    if any(math.isnan(v) for v in x + y):
        return False
    return all(p <= q for p, q in zip(x, y)) and any(p < q for p, q in zip(x, y))


def _minimised_array(points: Sequence[Sequence[float]], modes: Sequence[str]) -> np.ndarray:
    _check_modes(modes)
    rows = [_minimised(p, modes) for p in points]
    return np.asarray(rows, dtype=float).reshape(len(rows), len(modes))


def non_dominated_sort(points: Sequence[Sequence[float]], modes: Sequence[str]) -> list[int]:
    """Pareto rank per point (0 = first front) by fast non-dominated sort (Deb et al. 2002).

    Points with a NaN or None value get rank -1 and take no part in dominance.
    Identical non-dominated points share rank 0. Cost is O(M N^2) time, O(N) extra memory per row.
    """
    arr = _minimised_array(points, modes)
    ranks = np.full(len(arr), -1, dtype=int)
    valid = np.flatnonzero(~np.isnan(arr).any(axis=1))
    x = arr[valid]
    n = len(x)
    dominated_count = np.zeros(n, dtype=int)
    dominated_sets = []
    for i in range(n):
        beats = (x[i] <= x).all(axis=1) & (x[i] < x).any(axis=1)
        dominated_sets.append(np.flatnonzero(beats))
        dominated_count += beats
    front = np.flatnonzero(dominated_count == 0)
    rank = 0
    while front.size:
        ranks[valid[front]] = rank
        losers = np.concatenate([dominated_sets[i] for i in front])
        np.subtract.at(dominated_count, losers, 1)
        front = np.unique(losers[dominated_count[losers] == 0])
        rank += 1
    return ranks.tolist()


def objective_values(record: Mapping[str, Any], objectives: Sequence[Objective]) -> list[float] | None:
    """The record's objective values, or None if any is missing, None or NaN."""
    values = []
    for obj in objectives:
        v = record.get(obj.metric)
        if v is None or math.isnan(float(v)):
            return None
        values.append(float(v))
    return values


def pareto_front(records: Sequence[Mapping[str, Any]], objectives: Sequence[Objective]) -> list[int]:
    """Indices of the rank-0 records, ordered by ascending value of the first objective.

    Ties are broken by the remaining objectives, then by index, so the order is deterministic.
    Records lacking any objective (missing, None or NaN) are ignored.
    """
    if not objectives:
        raise ValueError("at least one objective is required")
    usable = [(i, v) for i, r in enumerate(records) if (v := objective_values(r, objectives)) is not None]
    ranks = non_dominated_sort([v for _, v in usable], [o.mode for o in objectives])
    front = [(v, i) for (i, v), rank in zip(usable, ranks) if rank == 0]
    return [i for _, i in sorted(front)]


def hypervolume_2d(
    points: Sequence[Sequence[float]], modes: Sequence[str], reference: Sequence[float]
) -> float:
    """Exact area dominated by `points` and bounded by `reference` (two objectives).

    Only points strictly better than the reference in both objectives count; dominated
    points add nothing, and NaN/None points are ignored. Returns 0.0 when none count.
    """
    if len(modes) != 2:
        raise ValueError(f"hypervolume_2d needs exactly two modes, got {len(modes)}")
    ref = _minimised(reference, modes)
    if not all(math.isfinite(v) for v in ref):
        raise ValueError(f"reference must be finite, got {list(reference)}")
    arr = _minimised_array(points, modes)
    arr = arr[~np.isnan(arr).any(axis=1)]
    arr = arr[(arr[:, 0] < ref[0]) & (arr[:, 1] < ref[1])]
    area, best_y = 0.0, ref[1]
    for x, y in sorted(map(tuple, arr.tolist())):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def reference_point(objectives: Sequence[Objective], *, parent: Mapping[str, float]) -> list[float]:
    """Fixed hypervolume reference: 0.0 for "max" metrics, 1.1 x the parent's value for "min" ones.

    Accuracy-like metrics are bounded below by 0; the 10 % cost slack makes a trial as
    expensive as the unpruned parent still count, provided its accuracy is above 0.
    Raises KeyError naming the metric if `parent` lacks a "min" metric, and ValueError
    if that value is not a positive finite number.
    """
    ref = []
    for obj in objectives:
        if obj.mode == "max":
            ref.append(0.0)
            continue
        if obj.metric not in parent:
            raise KeyError(f"parent has no value for cost metric {obj.metric!r}")
        cost = float(parent[obj.metric])
        if not (math.isfinite(cost) and cost > 0):
            raise ValueError(f"parent {obj.metric!r} must be positive and finite, got {cost}")
        ref.append(1.1 * cost)
    return ref
