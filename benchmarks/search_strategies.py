"""Search strategies side by side: random, NSGA-II, NSGA-II + CKA early selection and the
numerical-gradient searcher, each given the same budget of fine-tune trial-epochs.

    python benchmarks/search_strategies.py --out docs

What it measures, on real Fashion-MNIST with a CIFAR-style ResNet-20 parent (trained once,
cached by content hash in `--cache`, shared by every strategy):

- the hypervolume each strategy reaches (val_acc up, MACs down; one fixed reference point
  [0, 1.1 x parent MACs] for all) and its curve against compute spent (cumulative trial-epochs,
  trials in the order they ended) and against search wall time;
- the Spearman rank correlation between CKA to the parent right after pruning (before any
  fine-tune) and the final validation accuracy, over finished trials (pooled and per strategy);
- the share of fine-tune compute each strategy spent on trials that end off its own front;
- the per-trial framework overhead, mean of 1 - compute_s / wall_s over finished trials;
- the subnet a user would pick at half the parent's MACs (highest val_acc with MACs <= 0.5 x
  parent, pooled over the finished trials of all strategies) against torch-pruning's uniform
  magnitude (L2) pruning of the same parent at the same MACs, fine-tuned with the same recipe.

Every strategy runs through the product (`parse_config` -> `run_search`) with its own MLflow
sqlite store and Ray results folder under `--work`; trial-epochs are read back from MLflow
(one `val_acc` entry per epoch; step 0 is the pruned subnet before fine-tuning). Writes
`OUT/benchmarks.md`, `OUT/benchmarks/search_strategies.json` and the PNGs next to it; a
hand-written `## Observations` section already in the report is kept. `--from-json FILE` redraws
the figures and the report from saved numbers without running anything. The early-selection arm
gets more trials (`--early-trials`) than the plain ones (`--trials`), since stopped trials spend
fewer epochs; its hypervolume is also read where its trial-epochs reach trials x epochs.
A quick check of the script: `--limit-train 1000 --trials 4 --early-trials 6 --epochs 1
--parent-epochs 1 --out /tmp/smoke --work /tmp/smoke-work --cache /tmp/smoke-cache`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from prunetune.search.pareto import Objective, hypervolume_2d, pareto_front  # noqa: E402

from machine import FASHION_MNIST, cpu_name  # noqa: E402  (benchmarks/machine.py)

FMNIST = str(FASHION_MNIST)
MODES = ["max", "min"]
OBJECTIVES = [Objective("val_acc", "max"), Objective("macs", "min")]
EARLY_STOP = {"enabled": True, "warmup": 4, "dominated_by": 2, "bucket_quantile": 0.25,
              "rungs": [1], "reduction_factor": 2}
# name -> (label, config overrides, which trial count applies)
STRATEGIES = {
    "random": ("random search", {"sampler": {"name": "random"}}, "trials"),
    "nsga2": ("NSGA-II (Ray Tune + Optuna)", {"sampler": {"name": "nsga2", "population_size": 4}}, "trials"),
    "nsga2_cka": ("NSGA-II + CKA early selection",
                  {"sampler": {"name": "nsga2", "population_size": 4}, "early_stop": EARLY_STOP}, "early_trials"),
    "gradient": ("numerical gradient", {"sampler": {"name": "gradient",
                                                    "gradient": {"pairs": 2, "target_macs_ratio": 0.5}}}, "trials"),
}
COLORS = {"random": "tab:gray", "nsga2": "tab:blue", "nsga2_cka": "tab:orange", "gradient": "tab:green"}
LINES = {"random": "-", "nsga2": "--", "nsga2_cka": "-", "gradient": "-."}


# ---------------------------------------------------------------- settings and configs

def data_config(args) -> dict:
    return {"name": "fashion-mnist", "root": args.data, "limit_train": args.limit_train, "image_size": 28}


def parent_recipe(args) -> dict:
    return {"epochs": args.parent_epochs, "lr": 0.05, "batch_size": 128}


def finetune_recipe(args) -> dict:
    return {"epochs": args.epochs, "lr": 0.02, "batch_size": 128}


def experiment_config(args, name: str, overrides: dict, trials: int) -> dict:
    """The full experiment config of one strategy: everything but the sampler is shared."""
    work = Path(args.work) / name
    return {
        "name": f"bench-{name}", "seed": args.seed,
        "model": {"name": "cifar:resnet20"},
        "data": data_config(args),
        "parent": {"recipe": parent_recipe(args)},
        "space": {"channel_ratio": {"low": 0.25, "high": 1.0, "step": 0.125}, "depth": True, "resolutions": None},
        "budget": {"trials": trials, "concurrency": 2},
        "finetune": finetune_recipe(args),
        "resources": {"cpu": 1},
        "probes": {"size": 128},
        "cost": {"latency": False},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": f"bench-{name}"},
        "ray": {"storage_path": str(work / "ray_results")},
        "cache_dir": str(Path(args.cache)),
        **overrides,
    }


# ---------------------------------------------------------------- running one strategy

def trial_runs(uri: str, parent_run_id: str) -> list[dict]:
    """Every child run of one search from MLflow: status, end time, epochs trained, metrics."""
    from mlflow.tracking import MlflowClient

    from prunetune.search.tracking import PARENT_TAG, REASON_TAG, STATUS_TAG

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                              max_results=1000)
    rows = []
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "val_acc")
        steps = sorted({m.step for m in history})
        cka = [m.value for m in client.get_metric_history(r.info.run_id, "cka") if m.step == 0]
        rows.append({"run_id": r.info.run_id, "mlflow_status": r.info.status,
                     "prunetune_status": r.data.tags.get(STATUS_TAG, ""),
                     "stop_reason": r.data.tags.get(REASON_TAG, ""),
                     "end_s": ((r.info.end_time or r.info.start_time) - parent.info.start_time) / 1000.0,
                     "epochs": sum(s >= 1 for s in steps), "cka_step0": cka[0] if cka else None,
                     "val_acc_history": [m.value for m in sorted(history, key=lambda m: m.step)]})
    return rows


def run_strategy(args, name: str) -> dict:
    from prunetune.search.config import parse_config
    from prunetune.search.runner import run_search

    label, overrides, count = STRATEGIES[name]
    trials = getattr(args, count)
    work = Path(args.work) / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    raw = experiment_config(args, name, overrides, trials)
    cfg = parse_config(raw, source=f"<{name}>")
    print(f"\n=== {label}: {trials} trials ===", flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    outcome = run_search(cfg)
    wall = time.monotonic() - t0
    load_after = os.getloadavg()[0]
    runs = {r["run_id"]: r for r in trial_runs(cfg.tracking.uri, outcome.target.parent_run_id)}
    trials_out = []
    for rec in outcome.records:
        run = runs.get(rec.get("mlflow_run_id"), {})
        trials_out.append({**{k: v for k, v in rec.items() if isinstance(v, (int, float, str)) or v is None},
                           "epochs": run.get("epochs", 0), "end_s": run.get("end_s"),
                           "mlflow_status": run.get("mlflow_status"), "cka_step0": run.get("cka_step0"),
                           "stop_reason": run.get("stop_reason", ""),
                           "val_acc_history": run.get("val_acc_history", [])})
    parent_macs = outcome.front_doc["reference_point"][1] / 1.1
    return {"name": name, "label": label, "trials_requested": trials, "config": raw, "wall_s": wall,
            "load_avg_1min": [load_before, load_after],
            "product_hypervolume": outcome.hypervolume, "reference_point": outcome.front_doc["reference_point"],
            "parent_macs": parent_macs, "parent": outcome.front_doc.get("parent"),
            "parent_run_id": outcome.target.parent_run_id, "trials": trials_out,
            "unmatched_mlflow_runs": len(set(runs) - {t.get("mlflow_run_id") for t in outcome.records})}


# ---------------------------------------------------------------- analysis

def finished(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t.get("status") == "finished"]


def hypervolume(trials: list[dict], reference: list[float]) -> float:
    points = [[t["val_acc"], t["macs"]] for t in finished(trials)]
    return hypervolume_2d(points, MODES, reference) if points else 0.0


def hv_curve(trials: list[dict], reference: list[float]) -> list[dict]:
    """Hypervolume after each trial ends (MLflow end time order), with the compute spent so far."""
    order = sorted(trials, key=lambda t: (t["end_s"] is None, t["end_s"] or 0.0))
    curve, spent = [], 0
    for i, t in enumerate(order):
        spent += t["epochs"]
        curve.append({"trial_epochs": spent, "end_s": t["end_s"], "trials": i + 1,
                      "hypervolume": hypervolume(order[:i + 1], reference)})
    return curve


def hv_at_budget(curve: list[dict], budget: int) -> float:
    """Hypervolume once the trials that ended within `budget` trial-epochs are counted."""
    within = [c["hypervolume"] for c in curve if c["trial_epochs"] <= budget]
    return within[-1] if within else 0.0


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    r = np.empty(len(values))
    r[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):
        tie = values == v
        r[tie] = r[tie].mean()
    return r


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson correlation of the (tie-averaged) ranks."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def partial_spearman(x, y, z) -> float | None:
    """Spearman correlation of x and y with z held fixed (first-order partial correlation of ranks)."""
    rxy, rxz, ryz = spearman(x, y), spearman(x, z), spearman(y, z)
    if None in (rxy, rxz, ryz) or max(abs(rxz), abs(ryz)) >= 1:
        return None
    return (rxy - rxz * ryz) / float(np.sqrt((1 - rxz ** 2) * (1 - ryz ** 2)))


def vector_key(t: dict) -> tuple:
    return tuple(sorted((k, round(float(v), 6)) for k, v in t.items() if k.startswith(("ch.", "depth.", "heads."))))


def unique_subnets(trials: list[dict]) -> list[dict]:
    """One record per distinct vector: arms with the same seed share their first (random) trials,
    and a repeated vector trains to exactly the same numbers."""
    seen, out = set(), []
    for t in trials:
        if vector_key(t) not in seen:
            seen.add(vector_key(t))
            out.append(t)
    return out


def correlations(trials: list[dict]) -> dict:
    done = finished(trials)
    cka, acc, macs = ([t[k] for t in done] for k in ("cka", "val_acc", "macs"))
    return {"n": len(done), "cka_val": spearman(cka, acc), "macs_val": spearman(macs, acc),
            "cka_macs": spearman(cka, macs), "cka_val_given_macs": partial_spearman(cka, acc, macs)}


def false_stops(stopped_in: list[dict], others: list[dict]) -> list[dict]:
    """Stopped trials whose vector another arm trained to the end: what they would have reached."""
    full = {vector_key(t): t for t in finished(others)}
    rows = []
    for t in stopped_in:
        if t.get("status") == "stopped" and vector_key(t) in full:
            f = full[vector_key(t)]
            rows.append({"trial_id": t["trial_id"], "macs": t["macs"], "cka": t["cka"], "epochs": t["epochs"],
                         "val_acc_when_stopped": t["val_acc"], "final_val_acc_elsewhere": f["val_acc"],
                         "reason": t.get("stop_reason", "")})
    return rows


def front_ids(trials: list[dict]) -> set[str]:
    done = finished(trials)
    return {done[i]["trial_id"] for i in pareto_front(done, OBJECTIVES)}


def off_front_share(trials: list[dict]) -> float | None:
    on = front_ids(trials)
    total = sum(t["epochs"] for t in trials)
    off = sum(t["epochs"] for t in trials if t["trial_id"] not in on)
    return off / total if total else None


def overhead(trials: list[dict]) -> float | None:
    rows = [t for t in finished(trials) if t.get("wall_s") and t.get("compute_s") is not None]
    return float(np.mean([1 - t["compute_s"] / t["wall_s"] for t in rows])) if rows else None


def pick_at(trials: list[dict], max_macs: float) -> dict | None:
    """What `prunetune pick --max-macs` would choose: highest val_acc, ties -> fewer MACs."""
    ok = [t for t in finished(trials) if t["macs"] <= max_macs]
    return min(ok, key=lambda t: (-t["val_acc"], t["macs"])) if ok else None


def summarise(res: dict, reference: list[float], budget: int) -> dict:
    trials = res["trials"]
    done = finished(trials)
    curve = hv_curve(trials, reference)
    statuses = {s: sum(t.get("status") == s for t in trials) for s in ("finished", "stopped", "infeasible", "error")}
    return {"hypervolume": hypervolume(trials, reference), "hypervolume_at_budget": hv_at_budget(curve, budget),
            "curve": curve, "trial_epochs": sum(t["epochs"] for t in trials), "statuses": statuses,
            "front_size": len(front_ids(trials)), "off_front_share": off_front_share(trials),
            "overhead": overhead(trials),
            "spearman_cka_val": spearman([t["cka"] for t in done], [t["val_acc"] for t in done]),
            "correlations": correlations(trials),
            "stopped_at_cka": sum(t.get("status") == "stopped" and t["epochs"] == 0 for t in trials),
            "stopped_at_rung": sum(t.get("status") == "stopped" and t["epochs"] > 0 for t in trials),
            "best_val_acc": max((t["val_acc"] for t in done), default=None),
            "pick_half_macs": pick_at(trials, 0.5 * res["parent_macs"])}


# ---------------------------------------------------------------- parent and uniform magnitude baseline

def trained_parent(args):
    """The parent every search uses (same model, data, recipe, seed and cache, so the same
    cache entry); trained here first, on one thread like the trials, when not cached yet."""
    from prunetune.trainers.data import DataConfig, load_splits
    from prunetune.trainers.parent import get_parent
    from prunetune.trainers.recipe import TrainRecipe

    data = DataConfig.model_validate(data_config(args))
    cache = Path(args.cache).expanduser().resolve()
    splits = load_splits(data, seed=args.seed, cache_dir=cache)
    torch.set_num_threads(1)
    parent, info = get_parent("cifar:resnet20", data, splits, TrainRecipe.model_validate(parent_recipe(args)),
                              seed=args.seed, cache_dir=cache,
                              on_epoch=lambda s: print(f"parent epoch {s.epoch}: val_acc {s.val_acc:.3f} "
                                                       f"({s.seconds:.0f}s)", flush=True))
    return parent, info, splits


def uniform_baseline(args, target_macs: float) -> dict:
    """torch-pruning's uniform magnitude (L2) pruning of the same parent at `target_macs`:
    one keep ratio for every channel stage (depth untouched), found by bisection, then the
    same fine-tune recipe as every trial."""
    from prunetune.spaces import PruningVector, describe, measure_cost, prune
    from prunetune.trainers.finetune import evaluate, train_epochs
    from prunetune.trainers.recipe import TrainRecipe

    parent, info, splits = trained_parent(args)  # from the cache: the searches' parent
    torch.set_num_threads(1)  # as every trial (resources.cpu = 1)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    structure = describe(parent, example)
    stages = [s.name for s in structure.channel_stages]

    def pruned(r: float):
        vector = PruningVector(channels={s: r for s in stages})
        sub = prune(parent, vector, example, importance="l2", structure=structure, seed=args.seed)
        return sub, measure_cost(sub.module, in_channels=splits.in_channels, resolution=splits.image_size).macs

    lo, hi, best = 0.05, 1.0, None
    for _ in range(20):
        mid = (lo + hi) / 2
        _, macs = pruned(mid)
        if best is None or abs(macs / target_macs - 1) < abs(best[1] / target_macs - 1):
            best = (mid, macs)
        if abs(macs / target_macs - 1) <= 0.005:
            break
        lo, hi = (mid, hi) if macs < target_macs else (lo, mid)
    ratio = best[0]
    sub, macs = pruned(ratio)
    model = sub.module
    device = torch.device("cpu")
    val_before, _ = evaluate(model, splits.val, device=device)
    recipe = TrainRecipe.model_validate(finetune_recipe(args))
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    history = list(train_epochs(model, splits.train, splits.val, recipe, device=device, seed=args.seed))
    train_s = time.perf_counter() - t0
    test_acc, _ = evaluate(model, splits.test, device=device)
    params = measure_cost(model, in_channels=splits.in_channels, resolution=splits.image_size).params
    return {"ratio": ratio, "stages": stages, "macs": macs, "params": params, "target_macs": target_macs,
            "macs_error": macs / target_macs - 1, "val_acc_before": val_before,
            "val_acc": history[-1].val_acc, "val_acc_history": [h.val_acc for h in history],
            "test_acc": test_acc, "train_s": train_s,
            "parent_val_acc": info.val_acc, "parent_test_acc": info.test_acc, "parent_source": info.source}


# ---------------------------------------------------------------- figures

def _mfmt(x, _pos=None) -> str:
    return f"{x / 1e6:.0f}M"


def plot_hypervolume(results: dict, summaries: dict, budget: int, box: float, path: Path) -> None:
    """Hypervolume as a share of the reference box (1.0 = perfect accuracy at zero MACs)."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    for name, s in summaries.items():
        xs = [0] + [c["trial_epochs"] for c in s["curve"]]
        ts = [0] + [c["end_s"] for c in s["curve"]]
        hv = [0] + [c["hypervolume"] / box for c in s["curve"]]
        label = results[name]["label"]
        for ax, x in ((axes[0], xs), (axes[1], ts)):
            ax.step(x, hv, where="post", color=COLORS[name], ls=LINES[name], label=label, lw=2)
    axes[0].axvline(budget, color="k", ls=":", lw=1)
    axes[0].annotate(f"budget {budget}", (budget, 0.95), xycoords=("data", "axes fraction"),
                     xytext=(4, 0), textcoords="offset points", fontsize=9)
    axes[0].set(xlabel="fine-tune compute spent (cumulative trial-epochs, trials in end order)",
                ylabel="hypervolume / reference box", title="hypervolume vs compute")
    axes[1].set(xlabel="search wall time (s since the search run started)", title="hypervolume vs wall time")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9, loc="lower right")
    names = list(summaries)
    x = np.arange(len(names))
    at_budget = [summaries[n]["hypervolume_at_budget"] / box for n in names]
    final = [summaries[n]["hypervolume"] / box for n in names]
    axes[2].bar(x - 0.2, at_budget, 0.4, color=[COLORS[n] for n in names], label=f"at {budget} trial-epochs")
    axes[2].bar(x + 0.2, final, 0.4, color=[COLORS[n] for n in names], alpha=0.45, hatch="//", label="final")
    for xi, a, f in zip(x, at_budget, final):
        axes[2].text(xi - 0.2, a, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
        axes[2].text(xi + 0.2, f, f"{f:.3f}", ha="center", va="bottom", fontsize=8)
    lo, hi = min(at_budget + final), max(at_budget + final)
    pad = max(hi - lo, 0.01)
    axes[2].set_ylim(max(0.0, lo - 0.6 * pad), hi + 0.5 * pad)
    axes[2].set_xticks(x, [n.replace("_", "\n+") for n in names])
    axes[2].set(title="hypervolume reached (y axis not from 0)")
    axes[2].legend(fontsize=8, loc="upper right", ncol=2)
    axes[2].grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_trials(results: dict, path: Path, pick: dict | None, baseline: dict | None) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), sharex=True, sharey=True)
    accs = [t["val_acc"] for r in results.values() for t in finished(r["trials"])]
    floor = min(accs + ([baseline["val_acc"]] if baseline else [])) - 0.03
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items()):
        done = finished(res["trials"])
        on = front_ids(res["trials"])
        pts = np.array([[t["macs"], t["val_acc"]] for t in done]) if done else np.zeros((0, 2))
        front = sorted((t["macs"], t["val_acc"]) for t in done if t["trial_id"] in on)
        ax.scatter(pts[:, 0], pts[:, 1], s=22, color=COLORS[name], alpha=0.55, label="finished")
        if front:
            ax.plot(*zip(*front), "-o", color="k", ms=4, lw=1.2, label="front")
        stopped = [t for t in res["trials"] if t.get("status") == "stopped" and t.get("macs") is not None]
        trained = [t for t in stopped if t["epochs"] > 0]
        untrained = [t for t in stopped if t["epochs"] == 0]
        if trained:
            ax.scatter([t["macs"] for t in trained], [t["val_acc"] for t in trained], marker="x", s=28,
                       color="tab:red", label="stopped at the epoch-1 rung (val_acc then)")
        if untrained:
            ax.scatter([t["macs"] for t in untrained], [floor + 0.004] * len(untrained), marker="v", s=34,
                       color="tab:red", label="stopped before fine-tune (drawn at the bottom)")
        ax.axvline(0.5 * res["parent_macs"], color="k", ls=":", lw=1, label="0.5 x parent MACs")
        if baseline:
            ax.scatter([baseline["macs"]], [baseline["val_acc"]], marker="*", s=140, color="tab:purple",
                       label="uniform L2 baseline")
        if pick:
            ax.scatter([pick["macs"]], [pick["val_acc"]], marker="D", s=50, facecolors="none",
                       edgecolors="k", label="pick at 0.5x MACs")
        ax.set(title=res["label"], xlabel="MACs", ylim=(floor, None))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_mfmt))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val_acc after fine-tune")
    handles = {}
    for ax in np.atleast_1d(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, len(handles)), fontsize=9)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cka(results: dict, pooled_rho: float | None, path: Path) -> None:
    """CKA before fine-tune vs final val_acc: coloured by strategy, and by MACs (the confounder)."""
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8), sharey=True)
    done = unique_subnets([t for r in results.values() for t in finished(r["trials"])])
    for name, res in results.items():
        pts = finished(res["trials"])
        axes[0].scatter([t["cka"] for t in pts], [t["val_acc"] for t in pts], s=26, color=COLORS[name],
                        alpha=0.7, label=res["label"])
    sc = axes[1].scatter([t["cka"] for t in done], [t["val_acc"] for t in done], s=30,
                         c=[t["macs"] / 1e6 for t in done], cmap="viridis")
    fig.colorbar(sc, ax=axes[1], label="MACs (M)")
    axes[0].set(ylabel="val_acc after fine-tune", title="finished trials by strategy"
                + (f" (pooled Spearman rho {pooled_rho:.2f})" if pooled_rho is not None else ""))
    axes[1].set(title="distinct subnets, coloured by MACs")
    for ax in axes:
        ax.set(xlabel="CKA to the parent right after pruning (before fine-tune)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- report

def machine() -> dict:
    import ray

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "load_avg_at_start": os.getloadavg()}


def _f(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def render(doc: dict) -> str:
    s, res, budget = doc["summaries"], doc["results"], doc["settings"]["budget_trial_epochs"]
    st = doc["settings"]
    pm = doc["parent_macs"]
    lines = [
        "# Benchmarks: search strategies at an equal fine-tune budget",
        "",
        f"Measured {doc['date']} on {doc['machine']['cpu']} ({doc['machine']['cores']} cores, CPU only; "
        f"load average {doc['machine']['load_avg_at_start'][0]:.1f} at start: another engineer's tests shared "
        f"the machine), Python {doc['machine']['python']}, torch {doc['machine']['torch']}, "
        f"Ray {doc['machine']['ray']}. Produced by `benchmarks/search_strategies.py`; total runtime "
        f"{doc['total_runtime_s'] / 60:.1f} min. Raw numbers: `docs/benchmarks/search_strategies.json`.",
        "",
        "```bash",
        doc["command"],
        "```",
        "",
        "## Setup",
        "",
        f"- Data: Fashion-MNIST (real images, 28x28), seeded subset of {st['limit_train']} training images "
        f"({doc['splits']['train']} train / {doc['splits']['val']} validation carved from them), official "
        f"test split ({doc['splits']['test']} images) for test accuracy only.",
        f"- Parent: `cifar:resnet20`, {st['parent_epochs']} epochs (lr 0.05, batch 128), trained once and "
        f"shared through the parent cache: val_acc {doc['baseline']['parent_val_acc']:.3f}, test_acc "
        f"{doc['baseline']['parent_test_acc']:.3f}, {pm / 1e6:.2f}M MACs.",
        "- Space: channel keep ratio per stage in [0.25, 1.0] step 0.125, blocks kept per stage, native "
        "resolution only; `joint` policy, L2 importance. Objectives val_acc (max), MACs (min).",
        f"- Every trial: fine-tune {st['epochs']} epochs (lr 0.02, batch 128), probes 128 images, "
        "no latency measurement; 2 trials at a time, 1 CPU each; seed "
        f"{st['seed']}; same config for all strategies except the sampler (and early stop).",
        f"- Budget: {budget} trial-epochs per strategy. Plain strategies: {st['trials']} trials x "
        f"{st['epochs']} epochs. NSGA-II + CKA early selection: up to {st['early_trials']} trials "
        "(stopped trials use fewer epochs); its spent budget is measured, and its hypervolume is also "
        f"read at the point where its cumulative trial-epochs reach {budget}.",
        "- NSGA-II: `population_size: 4` in both NSGA-II arms (the default `max(4, trials // 3)` is "
        f"{max(4, st['trials'] // 3)} for {st['trials']} trials but would be {max(4, st['early_trials'] // 3)} "
        f"for the {st['early_trials']}-trial arm; fixed so that only early selection differs).",
        f"- Early selection: `{json.dumps(EARLY_STOP)}`.",
        "- Gradient searcher: `pairs: 2` (5 trials per iteration), `target_macs_ratio: 0.5`, other "
        "settings default.",
        f"- Hypervolume: recomputed here with `hypervolume_2d` and one reference point for all, "
        f"[0.0, 1.1 x parent MACs] = [0.0, {1.1 * pm / 1e6:.3f}M]; units accuracy x MACs. Trial-epochs "
        "are read from MLflow (number of `val_acc` entries at steps >= 1 of each child run).",
        "",
        "## Results",
        "",
        "![hypervolume](benchmarks/search_hypervolume.png)",
        "",
        "| strategy | trials (finished / stopped / error) | trial-epochs spent | hypervolume at "
        f"{budget} trial-epochs | final hypervolume | front size | best val_acc | off-front compute share | "
        "framework overhead | search wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, x in s.items():
        c = x["statuses"]
        lines.append(
            f"| {res[n]['label']} | {c['finished']} / {c['stopped']} / {c['error'] + c['infeasible']} | "
            f"{x['trial_epochs']} | {x['hypervolume_at_budget'] / 1e6:.3f}M | {x['hypervolume'] / 1e6:.3f}M | "
            f"{x['front_size']} | {_f(x['best_val_acc'])} | {_f(x['off_front_share'], '.0%')} | "
            f"{_f(x['overhead'], '.1%')} | {res[n]['wall_s']:.0f} s |")
    lines += [
        "",
        "1-minute load average before / after each search (2 cores; the machine was shared, so wall "
        "times are not comparable across strategies, trial-epochs are): " + ", ".join(
            f"{res[n]['label']} {res[n]['load_avg_1min'][0]:.1f} / {res[n]['load_avg_1min'][1]:.1f}"
            for n in s if "load_avg_1min" in res[n]) + ".",
        "",
        "Hypervolume normalised by the reference box (1.0 = a perfect classifier at zero MACs): "
        + ", ".join(f"{res[n]['label']} {x['hypervolume'] / (1.1 * pm):.3f}" for n, x in s.items()) + ".",
        "",
        "Off-front compute share: trial-epochs spent on trials that are not on the strategy's own final "
        "front (finished off-front trials plus stopped ones) over all its trial-epochs. Framework overhead: "
        "mean over finished trials of 1 - compute_s / wall_s (wall = Tune start -> complete seen by the driver; "
        "compute = fine-tune epochs + test evaluation).",
        "",
        "![trials](benchmarks/search_trials.png)",
        "",
        "### CKA before fine-tune vs final validation accuracy",
        "",
        "![cka](benchmarks/search_cka.png)",
        "",
        "Spearman rank correlations over finished trials. CKA is the mean linear CKA to the parent on the "
        "128 probe images right after pruning (step 0, before any fine-tune); val_acc is after the last "
        "fine-tune epoch. Bigger subnets have both higher CKA and higher accuracy, so the rank correlation "
        "of MACs with val_acc and the partial correlation of CKA with val_acc at fixed MACs are shown too. "
        "'Pooled, distinct subnets' counts each vector once (the three Optuna arms share their first "
        "random trials, which train to identical numbers).",
        "",
        "| finished trials | n | rho(CKA, val_acc) | rho(MACs, val_acc) | rho(CKA, MACs) | "
        "partial rho(CKA, val_acc given MACs) |",
        "|---|---|---|---|---|---|",
    ]
    u = doc["spearman"]["unique"]
    rows = [("pooled, distinct subnets", u),
            ("pooled, all finished trials", {"n": doc["spearman"]["pooled_n"], "cka_val": doc["spearman"]["pooled"]})]
    rows += [(res[n]["label"], x["correlations"]) for n, x in s.items()]
    for label, c in rows:
        lines.append(f"| {label} | {c['n']} | {_f(c.get('cka_val'))} | {_f(c.get('macs_val'))} | "
                     f"{_f(c.get('cka_macs'))} | {_f(c.get('cka_val_given_macs'))} |")
    if "nsga2_cka" in s:
        e = s["nsga2_cka"]
        lines += [
            "",
            "### What early selection stopped",
            "",
            f"NSGA-II + CKA early selection: {e['statuses']['stopped']} of {len(res['nsga2_cka']['trials'])} "
            f"trials stopped, {e['stopped_at_cka']} right after pruning (CKA stage, 0 fine-tune epochs) and "
            f"{e['stopped_at_rung']} at the epoch-1 rung of successive halving (1 epoch spent). Stopped "
            "trials whose vector another arm trained to the end (same seed, so the same numbers):",
            "",
            "| trial | MACs | CKA | epochs spent | val_acc when stopped | final val_acc in another arm | reason |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in doc["false_stops"]:
            lines.append(f"| {f['trial_id']} | {f['macs'] / 1e6:.2f}M | {f['cka']:.3f} | {f['epochs']} | "
                         f"{f['val_acc_when_stopped']:.3f} | {f['final_val_acc_elsewhere']:.3f} | {f['reason']} |")
        if not doc["false_stops"]:
            lines.append("| (none) | | | | | | |")
    p, b = doc["pick"], doc["baseline"]
    lines += [
        "",
        "### The subnet a user would pick at half the parent's MACs",
        "",
        f"Pooled over the finished trials of all strategies, the highest val_acc with MACs <= 0.5 x parent "
        f"({0.5 * pm / 1e6:.2f}M) (what `prunetune pick --max-macs` does on a front), compared with "
        "torch-pruning's uniform magnitude pruning: the same trained parent pruned through the engine's "
        "DepGraph/torch-pruning backend with L2 magnitude importance and ONE keep ratio for every channel "
        f"stage (no blocks removed), the ratio found by bisection so its MACs match the pick's, then "
        "fine-tuned with the same recipe, seed and device.",
        "",
        "| subnet | from | MACs | params | val_acc before fine-tune | val_acc | test_acc |",
        "|---|---|---|---|---|---|---|",
    ]
    if p:
        vec = ", ".join(f"{k}={float(v):.3g}" for k, v in sorted(p.items()) if k.startswith(("ch.", "depth.")))
        lines.append(f"| search pick ({vec}) | {res[p['strategy']]['label']} | {p['macs'] / 1e6:.2f}M | "
                     f"{_f(p.get('params'), ',.0f')} | {_f(p.get('val_acc_history', [None])[0])} | "
                     f"{p['val_acc']:.3f} | {_f(p.get('test_acc'))} |")
    if b:
        lines.append(f"| uniform L2 magnitude, keep ratio {b['ratio']:.3f} | baseline | {b['macs'] / 1e6:.2f}M "
                     f"({b['macs_error']:+.1%}) | {b['params']:,.0f} | {b['val_acc_before']:.3f} | "
                     f"{b['val_acc']:.3f} | {b['test_acc']:.3f} |")
    lines.append(f"| parent | - | {pm / 1e6:.2f}M | - | - | {b['parent_val_acc']:.3f} | {b['parent_test_acc']:.3f} |")
    lines += ["", "Per-strategy picks at 0.5 x parent MACs (val_acc / test_acc / MACs): " + "; ".join(
        f"{res[n]['label']} " + (f"{x['pick_half_macs']['val_acc']:.3f} / {_f(x['pick_half_macs'].get('test_acc'))}"
                                 f" / {x['pick_half_macs']['macs'] / 1e6:.2f}M" if x["pick_half_macs"] else "none")
        for n, x in s.items()) + ".", ""]
    return "\n".join(lines)


def write_report(path: Path, text: str) -> None:
    """Write the generated part; a hand-written `## Observations` section already there is kept."""
    kept = ""
    if path.exists():
        old = path.read_text()
        if "\n## Observations" in old:
            kept = old[old.index("\n## Observations"):]
    path.write_text(text.rstrip() + "\n" + kept)


# ---------------------------------------------------------------- main

def redraw(doc: dict, out: Path) -> None:
    """Figures and report from the measured numbers (`doc`, as saved in search_strategies.json)."""
    figs = out / "benchmarks"
    figs.mkdir(parents=True, exist_ok=True)
    results, summaries = doc["results"], doc["summaries"]
    budget = doc["settings"]["budget_trial_epochs"]
    plot_hypervolume(results, summaries, budget, doc["reference_point"][1], figs / "search_hypervolume.png")
    plot_trials(results, figs / "search_trials.png", doc["pick"], doc["baseline"])
    plot_cka(results, doc["spearman"]["pooled"], figs / "search_cka.png")
    write_report(out / "benchmarks.md", render(doc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"), help="docs folder (report + benchmarks/)")
    p.add_argument("--data", default=FMNIST)
    p.add_argument("--limit-train", type=int, default=6000)
    p.add_argument("--parent-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="fine-tune epochs per trial")
    p.add_argument("--trials", type=int, default=12, help="trials of the plain strategies")
    p.add_argument("--early-trials", type=int, default=32, help="trials of the early-selection arm (its "
                   "hypervolume is also read where its trial-epochs reach trials x epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument("--work", default="/tmp/prunetune-search-bench")
    p.add_argument("--cache", default="/tmp/prunetune-search-bench-cache")
    p.add_argument("--from-json", type=Path, default=None,
                   help="only redraw the figures and rewrite the report from a saved search_strategies.json")
    args = p.parse_args()
    if args.from_json:
        redraw(json.loads(args.from_json.read_text()), args.out)
        return
    t_start = time.monotonic()

    from prunetune.cluster.connect import connect, disconnect

    connect(None, num_cpus=2)
    info = machine()
    _, parent_info, splits = trained_parent(args)
    print(f"parent {parent_info.parent_id} ({parent_info.source}): val_acc {parent_info.val_acc:.3f}", flush=True)
    try:
        results = {name: run_strategy(args, name) for name in args.only}
    finally:
        disconnect()

    parent_macs = next(iter(results.values()))["parent_macs"]
    reference = [0.0, 1.1 * parent_macs]
    budget = args.trials * args.epochs
    summaries = {n: summarise(r, reference, budget) for n, r in results.items()}
    pooled = [t for r in results.values() for t in finished(r["trials"])]
    rho = spearman([t["cka"] for t in pooled], [t["val_acc"] for t in pooled])
    unique = correlations(unique_subnets(pooled))
    early = results.get("nsga2_cka")
    missed = false_stops(early["trials"], [t for n, r in results.items() if n != "nsga2_cka"
                                           for t in r["trials"]]) if early else []
    pick = pick_at([{**t, "strategy": n} for n, r in results.items() for t in r["trials"]], 0.5 * parent_macs)
    print(f"\npick at half MACs: {pick and {k: pick[k] for k in ('strategy', 'val_acc', 'macs')}}", flush=True)
    baseline = uniform_baseline(args, pick["macs"]) if pick else None

    figs = args.out / "benchmarks"
    figs.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": dt.date.today().isoformat(), "machine": info,
        "command": "python benchmarks/search_strategies.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("only", "out", "data", "from_json"))
        + f" --out {args.out}",
        "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "budget_trial_epochs": budget},
        "splits": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "parent_macs": parent_macs, "reference_point": reference,
        "parent_id": parent_info.parent_id, "parent_trained_in_this_run": parent_info.source == "trained",
        "results": results, "summaries": summaries,
        "spearman": {"pooled": rho, "pooled_n": len(pooled), "unique": unique},
        "false_stops": missed,
        "pick": pick, "baseline": baseline,
        "total_runtime_s": time.monotonic() - t_start,
    }
    (figs / "search_strategies.json").write_text(json.dumps(doc, indent=1, default=str))
    redraw(doc, args.out)
    print(f"\nwrote {args.out / 'benchmarks.md'} and {figs}; total {doc['total_runtime_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
