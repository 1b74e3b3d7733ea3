"""Trials per hour on the local cluster with 1 and 2 worker nodes, and what losing a worker costs.

    python benchmarks/cluster_throughput.py [--data digits|fashion-mnist] [--trials 8] [--epochs 3] [--out FILE]

One run, side by side, the same search (configs/quickstart.yaml with --trials/--epochs, 2 trials
at a time, a warm parent cache shared by all runs) submitted with `prunetune launch --no-pip` to:
1. a LocalCluster with 1 worker node (1 CPU), 2. one with 2 worker nodes (1 CPU each),
3. the 2-node cluster again, SIGKILLing worker 0 once both running trials are past fine-tune
   epoch 1 (as tests/cluster/test_fault_tolerance.py does).
Trials per hour = finished trials / (last trial end - first trial start), from the MLflow runs
(parent training and driver start-up excluded; the job's wall time is reported too). The kill's
cost: fine-tune epochs computed twice (logged before the kill and again after the restart), the
part of the epoch in flight at the kill, the victim's downtime (kill -> its next logged epoch)
and the job's wall time against run 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from machine import FASHION_MNIST, cpu_name
from prunetune.cluster import jobs
from prunetune.cluster.local import LocalCluster
from prunetune.cluster.mlflow_local import LocalMlflowServer
from prunetune.search.cli import main as cli
from prunetune.search.tracking import ROLE_TAG, TRIAL_TAG

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
DATA = "digits"


def _config(work: Path, name: str, uri: str, cache: Path, trials: int, epochs: int) -> Path:
    cfg = yaml.safe_load(QUICKSTART.read_text())
    if DATA == "fashion-mnist":   # heavier trials: 6,000 training images at 28 px
        cfg["data"] = {"name": "fashion-mnist", "root": str(FASHION_MNIST), "val_fraction": 0.1, "limit_train": 6000}
        cfg["space"]["resolutions"] = [20, 24, 28]
        cfg["parent"]["recipe"] = {"epochs": 3, "lr": 0.1, "batch_size": 128}
        cfg["finetune"]["batch_size"] = 128
    cfg.update(name=name, tracking={"uri": uri}, cache_dir=str(cache),
               budget={"trials": trials, "concurrency": 2},
               ray={"storage_path": str(work / "ray_results"), "max_failures": 3})
    cfg["finetune"]["epochs"] = epochs
    (work / name).mkdir()
    path = work / name / "search.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _trials(client: MlflowClient, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get(ROLE_TAG) == "trial"] if exp else []


def _history(client, run) -> list:
    return sorted(client.get_metric_history(run.info.run_id, "val_acc"), key=lambda m: m.timestamp)


def run_search(work: Path, cache: Path, name: str, *, workers: int, trials: int, epochs: int, kill: bool) -> dict:
    with LocalCluster(workers, cpus_per_worker=1, state_dir=work / f"{name}-state") as cluster, \
            LocalMlflowServer(work / f"{name}-mlflow") as server:
        os.environ.update(cluster.env())
        os.environ.pop("RAY_ADDRESS", None)
        config = _config(work, name, server.uri, cache, trials, epochs)
        client = MlflowClient(server.uri)
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = cli(["launch", str(config), "--address", cluster.dashboard_url, "--no-pip", "--no-follow"])
        assert code == 0, out.getvalue()
        job = next(w for w in out.getvalue().split() if w.startswith("raysubmit_"))
        c = jobs.client(cluster.dashboard_url)
        kill_at = None
        while kill and kill_at is None:
            running = [r for r in _trials(client, name) if r.info.status == "RUNNING"]
            if sum(max((m.step for m in _history(client, r)), default=-1) >= 1 for r in running) >= 2:
                time.sleep(0.5)
                cluster.kill_worker(0)
                kill_at = time.time()
            time.sleep(0.2)
        status = jobs.wait(c, job, timeout_s=3600)
        wall = time.time() - t0
        runs = _trials(client, name)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        span = (max(r.info.end_time for r in finished) - min(r.info.start_time for r in runs)) / 1000
        res = {"workers": workers, "job_status": status, "job_wall_s": round(wall, 1),
               "trials_finished": len(finished), "trial_span_s": round(span, 1),
               "trials_per_hour": round(len(finished) / span * 3600, 1),
               "mean_trial_s": round(statistics.mean((r.info.end_time - r.info.start_time) / 1000 for r in finished), 1)}
        if kill:
            res.update(_kill_cost(client, runs, kill_at))
        return res


def _kill_cost(client, runs, kill_at: float) -> dict:
    """The trial that lost its node is the one whose next epoch after the kill came last."""
    spans = []
    for r in runs:
        hist = _history(client, r)
        before = [m for m in hist if m.timestamp / 1000 <= kill_at]
        after = [m for m in hist if m.timestamp / 1000 > kill_at]
        if before and after:
            spans.append((after[0].timestamp / 1000 - kill_at, r, hist, before, after))
    if not spans:
        return {"victim_trial": None}
    downtime, r, hist, before, after = max(spans, key=lambda t: t[0])
    steps = [m.step for m in hist]
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(hist, hist[1:]) if a.step >= 1 and b.step == a.step + 1]
    epoch_s = statistics.median(gaps) if gaps else float("nan")
    redone = len(steps) - len(set(steps))
    in_flight = (kill_at - before[-1].timestamp / 1000) / epoch_s
    return {"victim_trial": r.data.tags[TRIAL_TAG], "epoch_s_median": round(epoch_s, 2),
            "last_epoch_before_kill": before[-1].step, "epochs_logged_twice": redone,
            "epoch_fraction_in_flight_at_kill": round(in_flight, 2),
            "lost_trial_epochs": round(redone + in_flight, 2),
            "victim_downtime_s": round(downtime, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kill-epochs", type=int, default=6, help="fine-tune epochs in the worker-kill run")
    ap.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits",
                    help="digits: the quickstart as it is; fashion-mnist: 6,000 images at 28 px (heavier trials)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    global DATA
    DATA = args.data
    with tempfile.TemporaryDirectory(prefix="ptc-tput-") as tmp:
        work = Path(tmp)
        cache = work / "cache"
        warm = run_search(work, cache, "warmup", workers=1, trials=1, epochs=1, kill=False)  # trains the parent
        runs = [run_search(work, cache, "one-worker", workers=1, trials=args.trials, epochs=args.epochs, kill=False),
                run_search(work, cache, "two-workers", workers=2, trials=args.trials, epochs=args.epochs, kill=False),
                run_search(work, cache, "two-workers-kill", workers=2, trials=args.trials, epochs=args.kill_epochs,
                           kill=True)]
    report = {"date": str(date.today()), "cpu": cpu_name(), "cores": os.cpu_count(), "data": args.data,
              "load_1min_at_end": round(os.getloadavg()[0], 1), "trials": args.trials, "epochs": args.epochs,
              "warmup_job_wall_s": warm["job_wall_s"], "runs": runs,
              "speedup_2_vs_1": round(runs[1]["trials_per_hour"] / runs[0]["trials_per_hour"], 2)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
