"""Where a trial's time goes: framework overhead (Ray + MLflow + setup + materialization)
against useful compute (fine-tune epochs + test evaluation), per trial, from one real search.

    python benchmarks/trial_overhead.py configs/quickstart.yaml [more configs] --out docs/benchmarks/trial_overhead.md

Each config runs in a fresh temporary working directory (its own sqlite MLflow store and Ray
results) with the user's parent cache. Driver-observed wall time per trial comes from the
progress callback (Tune's trial start -> complete); the parts come from the trial's own timers.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics as st
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from prunetune.search.config import load_config
from prunetune.search.runner import run_search
from prunetune.search.tracking import ROLE_TAG
from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)


def measure(config: Path) -> dict:
    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as work:
        cfg = cfg.model_copy(update={
            "tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{work}/mlflow.db"}),
            "ray": cfg.ray.model_copy(update={"storage_path": Path(work) / "ray_results"}),
        })
        t0 = time.monotonic()
        outcome = run_search(cfg)
        wall = time.monotonic() - t0
        client = MlflowClient(cfg.tracking.uri)
        exp = client.get_experiment_by_name(cfg.experiment_name)
        runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get(ROLE_TAG) == "trial" and r.info.status == "FINISHED"]
        mat = {}
        for r in runs:
            hist = client.get_metric_history(r.info.run_id, "materialize_s")
            mat[r.info.run_id] = hist[0].value if hist else 0.0
    walls = {r["mlflow_run_id"]: r["wall_s"] for r in outcome.records if r.get("status") == "finished"}
    rows = []
    for r in runs:
        m = r.data.metrics
        w = walls.get(r.info.run_id)
        if w is None:
            continue
        rows.append({"wall": w, "compute": m["compute_s"], "mlflow": m["mlflow_s"], "setup": m["setup_s"],
                     "materialize": mat[r.info.run_id], "in_trial": m["trial_s"]})
    mean = {k: st.mean(x[k] for x in rows) for k in rows[0]}
    mean["ray_and_scheduling"] = mean["wall"] - mean["in_trial"]
    mean["overhead_fraction"] = st.mean(1 - x["compute"] / x["wall"] for x in rows)
    return {"config": str(config), "trials": len(rows), "search_wall_s": wall, **mean}


def render(results: list[dict]) -> str:
    head = (f"# Per-trial framework overhead\n\nMeasured {time.strftime('%Y-%m-%d')} on {cpu_name()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, CPU only, by "
            "`benchmarks/trial_overhead.py`. Means over the finished trials of one search each.\n\n"
            "Overhead = everything in a trial's driver-observed wall time that is not fine-tuning or "
            "test evaluation: Ray scheduling and reporting, MLflow logging, data/parent setup, and "
            "materialization (pruning, cost counting, CKA probes, the pre-fine-tune validation pass).\n\n"
            "| config | trials | search wall s | trial wall s | compute s | materialize s | MLflow s | "
            "setup s | Ray + scheduling s | overhead fraction |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [f"| `{r['config']}` | {r['trials']} | {r['search_wall_s']:.0f} | {r['wall']:.2f} | "
            f"{r['compute']:.2f} | {r['materialize']:.2f} | {r['mlflow']:.2f} | {r['setup']:.2f} | "
            f"{r['ray_and_scheduling']:.2f} | {r['overhead_fraction']:.1%} |" for r in results]
    return head + "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    text = render([measure(c) for c in args.configs])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
