"""Write the Pareto front of a search as JSON, CSV and a PNG scatter plot.

Plain file output so results can be inspected or logged (e.g. as MLflow artifacts) by the caller.
Only trials with status "finished" compete for the front; stopped or failed trials are
listed in trials.csv with pareto_rank -1 and drawn hollow when they have both plotted values.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prunetune.search.front_html import render_front_html
from prunetune.search.pareto import (
    Objective,
    objective_values,
    hypervolume_2d,
    non_dominated_sort,
    pareto_front,
    reference_point,
)

FINISHED = "finished"


def _columns(records: Sequence[Mapping[str, Any]], leading: Sequence[str]) -> list[str]:
    """trial_id, then `leading`, then every other key sorted."""
    head = ["trial_id", *(k for k in leading if k != "trial_id")]
    rest = {str(k) for r in records for k in r} - set(head)
    return head + sorted(rest)


def _write_csv(path: Path, records: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(records)


def _jsonable(value: Any) -> Any:
    """Plain JSON value: numpy scalars unwrapped, NaN/inf as null, containers recursed."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _plot_axes(objectives: Sequence[Objective]) -> tuple[Objective, Objective]:
    """(x, y) for the plot: the cost ("min") objective on x when the first two differ in mode."""
    first, second = objectives[0], objectives[1]
    if first.mode == "max" and second.mode == "min":
        return second, first
    return first, second


def _axis(obj: Objective) -> tuple[float, str]:
    """Scale factor and label for an objective's axis."""
    if obj.metric == "macs":
        return 1e-6, "MACs (millions)"
    return 1.0, f"{obj.metric} ({obj.mode})"


def _write_png(
    path: Path,
    finished: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    others: Sequence[Mapping[str, Any]],
    objectives: Sequence[Objective],
    title: str,
    parent: Mapping[str, float] | None,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xo, yo = _plot_axes(objectives)
    (xs, xlabel), (ys, ylabel) = _axis(xo), _axis(yo)

    def xy(recs: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
        pts = [v for r in recs if (v := objective_values(r, [xo, yo])) is not None]
        return [p[0] * xs for p in pts], [p[1] * ys for p in pts]

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dx, dy = xy(finished)
    if dx:
        ax.scatter(dx, dy, s=18, color="0.6", label=f"finished trials ({len(dx)})", zorder=2)
    if not finished:
        ax.text(0.5, 0.5, "no finished trials", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ox, oy = xy(others)
    if ox:
        ax.scatter(ox, oy, s=22, facecolors="none", edgecolors="0.45", label=f"stopped / not finished ({len(ox)})", zorder=2)
    fx, fy = xy(front)
    if fx:
        if len(objectives) == 2:
            ax.step(fx, fy, where="post" if xo.mode == "min" else "pre", color="tab:red", lw=1.2, zorder=3)
        ax.scatter(fx, fy, s=40, color="tab:red", edgecolors="black", linewidths=0.5, label=f"Pareto front ({len(fx)})", zorder=4)
    if parent is not None and xo.metric in parent and yo.metric in parent:
        ax.scatter([float(parent[xo.metric]) * xs], [float(parent[yo.metric]) * ys], marker="*", s=220,
                   color="gold", edgecolors="black", linewidths=0.7, label="parent", zorder=5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_front_artifacts(
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[Objective],
    out_dir: Path,
    *,
    title: str,
    parent: Mapping[str, float] | None = None,
) -> dict[str, Path]:
    """Write front.json, front.csv, trials.csv, front.png and front.html (interactive) into `out_dir`.

    front.json always has "objectives", "front" (records in front order) and "n_trials";
    "reference_point" and "hypervolume" are filled when `parent` is given and there are
    exactly two objectives, else null. The plot shows the first two objectives.
    """
    if len(objectives) < 2:
        raise ValueError("a Pareto front report needs at least two objectives")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = [o.mode for o in objectives]
    metrics = [o.metric for o in objectives]

    finished_idx = [i for i, r in enumerate(records) if r.get("status") == FINISHED]
    finished = [records[i] for i in finished_idx]
    front = [finished[i] for i in pareto_front(finished, objectives)]

    ranks = [-1] * len(records)
    scored = [(i, v) for i in finished_idx if (v := objective_values(records[i], objectives)) is not None]
    for (i, _), rank in zip(scored, non_dominated_sort([v for _, v in scored], modes)):
        ranks[i] = rank

    ref = hv = None
    if parent is not None and len(objectives) == 2:
        ref = reference_point(objectives, parent=parent)
        hv = hypervolume_2d([v for _, v in scored], modes, ref)

    front_columns = _columns(front, metrics)
    paths = {
        "json": out_dir / "front.json",
        "csv": out_dir / "front.csv",
        "trials_csv": out_dir / "trials.csv",
        "png": out_dir / "front.png",
        "html": out_dir / "front.html",
    }
    payload = {
        "objectives": [{"metric": o.metric, "mode": o.mode} for o in objectives],
        "front": [{k: r[k] for k in front_columns if k in r} for r in front],
        "hypervolume": hv,
        "reference_point": ref,
        "n_trials": len(records),
    }
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    _write_csv(paths["csv"], front, front_columns)
    ranked = [{**r, "pareto_rank": rank} for r, rank in zip(records, ranks)]
    _write_csv(paths["trials_csv"], ranked, _columns(ranked, [*metrics, "pareto_rank"]))
    others = [r for r in records if r.get("status") != FINISHED]
    _write_png(paths["png"], finished, front, others, objectives, title, parent)
    paths["html"].write_text(render_front_html(records, {r.get("trial_id") for r in front}, objectives,
                                               title=title, parent=parent))
    return paths
