"""Read a search's Pareto front back from MLflow and show it as a table."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from prunetune.search.tracking import ROLE_TAG


class FrontNotFound(LookupError):
    pass


def latest_search_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise FrontNotFound(f"no MLflow experiment named {experiment!r} (found: {', '.join(names) or 'none'})")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for run in runs:
        if any(a.path == "front" for a in client.list_artifacts(run.info.run_id)):
            return run
    raise FrontNotFound(f"experiment {experiment!r} has no finished search with a front yet")


def load_front(uri: str, experiment: str) -> tuple[dict, str]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client = MlflowClient(uri)
    run = latest_search_run(client, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "front/front.json", tmp)
        return json.loads(Path(path).read_text()), run.info.run_id


def vector_summary(rec: dict) -> str:
    """Compact vector: channel keep ratios / blocks kept per stage, then the resolution."""
    ch = [f"{float(rec[k]):.2g}" for k in sorted(rec) if k.startswith("ch.")]
    depth = [str(int(float(rec[k]))) for k in sorted(rec) if k.startswith("depth.")]
    heads = [f"{float(rec[k]):.2g}" for k in sorted(rec) if k.startswith("heads.")]
    parts = []
    if ch:
        parts.append("ch " + "/".join(ch))
    if heads:
        parts.append("h " + "/".join(heads))
    if depth:
        parts.append("d " + "/".join(depth))
    if rec.get("resolution") not in (None, ""):
        parts.append(f"r {int(float(rec['resolution']))}")
    return " ".join(parts) or "-"


def policy_summary(rec: dict) -> str:
    """Policy name and its searched hyperparameters, e.g. `sap gamma=1.3`; plus distillation."""
    name = rec.get("policy") or "joint"
    parts = [str(name)]
    for k in sorted(rec):
        if k.startswith(f"{name}.") or k.startswith("distill."):
            v = rec[k]
            parts.append(f"{k.removeprefix(f'{name}.')}={float(v):.3g}" if isinstance(v, (int, float))
                         else f"{k.removeprefix(f'{name}.')}={v}")
    return " ".join(parts)


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v in (None, "") else format(float(v) / scale, fmt)


def front_table(front: Sequence[dict], *, title: str) -> Table:
    table = Table(title=title)
    for col in ("trial", "val_acc", "test_acc", "MMACs", "Mparams", "ms", "CKA", "policy", "vector"):
        table.add_column(col, justify="left" if col in ("trial", "policy", "vector") else "right")
    for r in front:
        table.add_row(str(r.get("trial_id", "-")), _num(r.get("val_acc"), ".4f"), _num(r.get("test_acc"), ".4f"),
                      _num(r.get("macs"), ".2f", 1e6), _num(r.get("params"), ".3f", 1e6),
                      _num(r.get("latency_ms"), ".2f"),
                      _num(r.get("cka"), ".3f"), policy_summary(r), vector_summary(r))
    return table


def print_front(doc: dict, console: Console, *, title: str) -> None:
    console.print(front_table(doc.get("front", []), title=title))
    if doc.get("hypervolume") is not None:
        console.print(f"hypervolume {doc['hypervolume']:.4g} (reference point {doc.get('reference_point')}, "
                      f"{doc.get('n_trials')} trials)", highlight=False)
