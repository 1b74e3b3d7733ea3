"""SAP (Diao et al., ICLR 2023) on real Fashion-MNIST, CPU: its PQ Index dynamics, and SAP
against iterative magnitude pruning (IMP, lottery-ticket style).

What it measures, for the paper's small models (``paper:mlp``, ``paper:cnn``, see
``trainers/paper_models.py``):

1. PQI dynamics: Algorithm 1 faithfully. Seeded random init w_init; round 0 trains the dense
   network; each later round t = 1..T takes one global SAP step (``trainers.sap.sap_step``,
   p=0.5, q=1, eta_r=0, gamma=1, beta=0.9) on the previous round's trained weights, rewinds
   the survivors to w_init and trains E epochs with the mask held. Per round: the global PQ
   Index of the trained unmasked weights, the remaining share of prunable weights, validation
   and test accuracy; also the PQI of the rewound start point w_init*m_t and how far training
   moves the weights from it (drift), to tell where a change in PQI comes from.
2. SAP vs IMP: IMP removes 20% of the remaining weights per round (global magnitude), with the
   same init, rewind, data order, epochs and rounds. Round 0 (dense) is shared by both.

w_init and the prunable-weight set come from the product's SAP policy
(``trainers.policies.sap._init_state`` and ``_prunable_weights``); training is
``trainers.finetune.train_epochs`` with the paper's SGD recipe (lr 0.1, momentum 0.9,
wd 5e-4, Nesterov, batch 250, cosine annealing). Each round's network is its last epoch
(cosine to 0); validation is carved from the training data, the test split is only reported.

Run (defaults are what docs/benchmarks/sap.md reports; about 13 minutes wall, 8 CPU-minutes, on a
shared 2-core machine with one torch thread):

    python benchmarks/sap_dynamics.py --out docs/benchmarks

``--iterations`` and ``--epochs`` take one value for every model or one per ``--models`` entry.
Writes sap.md, sap.json, sap_pqi_dynamics.png and sap_vs_imp.png into ``--out``;
``--replot`` rewrites sap.md and the plots from an existing sap.json without training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from prunetune.spaces.masks import apply_masks  # noqa: E402
from prunetune.trainers import paper_models  # noqa: E402
from prunetune.trainers.data import DataConfig, DataSplits, load_splits  # noqa: E402
from prunetune.trainers.finetune import evaluate, train_epochs  # noqa: E402
from prunetune.trainers.models import build_model  # noqa: E402
from prunetune.trainers.policies.sap import _init_state, _prunable_weights  # noqa: E402
from prunetune.trainers.recipe import TrainRecipe  # noqa: E402
from prunetune.trainers.sap import SAPConfig, pq_index, sap_step  # noqa: E402
from machine import FASHION_MNIST, cpu_name  # noqa: E402  (benchmarks/machine.py)

CPU = torch.device("cpu")
MODELS = {"mlp": "paper:mlp", "cnn": "paper:cnn"}
IMP_RATE = 0.2
PAPER = {"epochs": 200, "iterations": 30}
PATTERN_TOL = 0.005   # smallest PQI change counted as a decrease/increase
Masks = dict[str, torch.Tensor]
Step = Callable[[dict[str, torch.Tensor], Masks], tuple[Masks, int]]


@dataclass
class Round:
    """One prune-rewind-train round; ``pruned`` is what the step before it removed."""

    iteration: int
    remaining: float                     # share of prunable weights unmasked during this round
    pruned: int
    pqi: float                           # global PQ Index of this round's trained unmasked weights
    init_pqi: float                      # the same PQ Index of the rewound weights w_init * mask
    drift: float                         # ||w_t - w_init * mask|| / ||w_init * mask|| over masked tensors
    val_acc: float
    test_acc: float
    layer_remaining: dict[str, float]
    seconds: float


# ----------------------------------------------------------------------------- pruning steps

def magnitude_step(weights: dict[str, torch.Tensor], masks: Masks, rate: float) -> tuple[Masks, int]:
    """IMP step: remove floor(rate * d) smallest-|w| unmasked weights over all tensors (global)."""
    names = list(weights)
    flat_w = torch.cat([weights[n].detach().flatten() for n in names])
    flat_m = torch.cat([masks[n].flatten() for n in names]).clone()
    alive = flat_m.nonzero(as_tuple=True)[0]
    c = math.floor(rate * alive.numel())
    order = torch.argsort(flat_w[alive].abs(), stable=True)
    flat_m[alive[order[:c]]] = False
    parts = flat_m.split([weights[n].numel() for n in names])
    return {n: part.view_as(masks[n]).clone() for n, part in zip(names, parts)}, c


def sap_global_step(cfg: SAPConfig) -> Step:
    def step(weights: dict[str, torch.Tensor], masks: Masks) -> tuple[Masks, int]:
        new, stats = sap_step(weights, masks, cfg)
        return new, stats["pruned"]
    return step


def imp_step(rate: float) -> Step:
    return lambda weights, masks: magnitude_step(weights, masks, rate)


def global_pqi(weights: dict[str, torch.Tensor], masks: Masks, cfg: SAPConfig) -> float:
    return pq_index(torch.cat([weights[n].detach()[masks[n]] for n in weights]), cfg.p, cfg.q)


def relative_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    num = sum(float((after[n] - before[n]).pow(2).sum()) for n in before)
    den = sum(float(before[n].pow(2).sum()) for n in before)
    return math.sqrt(num / den) if den else 0.0


# ----------------------------------------------------------------------------- training rounds

def trained_round(model: nn.Module, masks: Masks, splits: DataSplits, recipe: TrainRecipe, *,
                  iteration: int, pruned: int, cfg: SAPConfig, seed: int) -> Round:
    """Train ``model`` (already rewound and masked) for the recipe's epochs holding ``masks``."""
    t0 = time.perf_counter()
    start = {n: p.detach().clone() for n, p in _prunable_weights(model).items()}
    val_acc = 0.0
    for stats in train_epochs(model, splits.train, splits.val, recipe, device=CPU, seed=seed,
                              after_step=lambda m: apply_masks(m, masks)):
        val_acc = stats.val_acc
    test_acc = evaluate(model, splits.test, device=CPU)[0]
    weights = {n: p.detach() for n, p in _prunable_weights(model).items()}
    kept = sum(int(m.count_nonzero()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return Round(iteration, kept / total, pruned, global_pqi(weights, masks, cfg), global_pqi(start, masks, cfg),
                 relative_change(start, weights), val_acc, test_acc,
                 {n: int(m.count_nonzero()) / m.numel() for n, m in masks.items()},
                 time.perf_counter() - t0)


def prune_rewind_train(model: nn.Module, w_init: dict, dense_state: dict, splits: DataSplits,
                       recipe: TrainRecipe, step: Step, *, iterations: int, cfg: SAPConfig,
                       seed: int, label: str) -> list[Round]:
    """Rounds 1..T of Algorithm 1 with the given pruning step, starting from the dense round."""
    model.load_state_dict(dense_state)
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in _prunable_weights(model).items()}
    rounds = []
    for t in range(1, iterations + 1):
        weights = {n: p.detach().clone() for n, p in _prunable_weights(model).items()}
        masks, pruned = step(weights, masks)
        model.load_state_dict(w_init)          # rewind to the original initialisation
        apply_masks(model, masks)
        rounds.append(trained_round(model, masks, splits, recipe, iteration=t, pruned=pruned, cfg=cfg, seed=seed))
        report(label, rounds[-1], iterations)
    return rounds


def report(label: str, r: Round, iterations: int) -> None:
    print(f"[{label}] t={r.iteration:2d}/{iterations} remaining={r.remaining:7.2%} pruned={r.pruned:6d} "
          f"pqi={r.pqi:.4f} (init {r.init_pqi:.4f}) drift={r.drift:.2f} val={r.val_acc:.4f} "
          f"test={r.test_acc:.4f} ({r.seconds:.1f}s)", flush=True)


def run_model(key: str, splits: DataSplits, *, iterations: int, epochs: int, cfg: SAPConfig, seed: int) -> dict:
    """Dense round 0, then SAP and IMP from the same init and dense weights."""
    torch.manual_seed(seed)
    model = build_model(MODELS[key], in_channels=splits.in_channels, num_classes=splits.num_classes)
    w_init = _init_state(model, seed)
    init_matches = all(torch.equal(w_init[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(w_init)
    recipe = TrainRecipe(epochs=epochs, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, batch_size=250)
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in _prunable_weights(model).items()}
    dense = trained_round(model, ones, splits, recipe, iteration=0, pruned=0, cfg=cfg, seed=seed)
    report(f"{key} dense", dense, iterations)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    common = dict(iterations=iterations, cfg=cfg, seed=seed)
    sap = prune_rewind_train(model, w_init, dense_state, splits, recipe, sap_global_step(cfg),
                             label=f"{key} sap", **common)
    imp = prune_rewind_train(model, w_init, dense_state, splits, recipe, imp_step(IMP_RATE),
                             label=f"{key} imp", **common)
    return {"model": MODELS[key], "epochs": epochs, "iterations": iterations,
            "params": sum(p.numel() for p in model.parameters()),
            "prunable": sum(m.numel() for m in ones.values()),
            "layers": {n: m.numel() for n, m in ones.items()},
            "w_init_matches_build": init_matches,
            "sap": [asdict(dense)] + [asdict(r) for r in sap],
            "imp": [asdict(dense)] + [asdict(r) for r in imp]}


# ----------------------------------------------------------------------------- analysis

def pqi_pattern(pqi: list[float], tol: float = PATTERN_TOL) -> dict:
    """Search rounds i1 < i2 < i3 with PQI falling from round 0 to i1, rising to i2, falling to i3.

    Each change must exceed ``tol``; the triple with the largest smallest change wins.
    """
    best, n = None, len(pqi)
    for i1 in range(1, n):
        drop1 = pqi[0] - pqi[i1]
        if drop1 <= tol:
            continue
        for i2 in range(i1 + 1, n):
            rise = pqi[i2] - pqi[i1]
            if rise <= tol:
                continue
            for i3 in range(i2 + 1, n):
                drop2 = pqi[i2] - pqi[i3]
                if drop2 > tol and (best is None or min(drop1, rise, drop2) > best["strength"]):
                    best = {"rounds": [i1, i2, i3], "strength": min(drop1, rise, drop2)}
    signs = "".join("+" if b - a > tol else "-" if a - b > tol else "=" for a, b in zip(pqi, pqi[1:]))
    falling = all(b < a for a, b in zip(pqi, pqi[1:]))
    low = min(range(n), key=pqi.__getitem__)
    return {"found": best is not None, "signs": signs, "strictly_falling": falling,
            "min_round": low, "rise_after_min": max(pqi[low:]) - pqi[low], **(best or {})}


def first_round_below(rounds: list[dict], share: float) -> int | None:
    return next((r["iteration"] for r in rounds if r["remaining"] <= share), None)


def matched_rounds(sap: list[dict], imp: list[dict], within: float = 1.25) -> list[tuple[dict, dict]]:
    """(SAP round, IMP round) pairs at similar sparsity: for each pruned IMP round, the SAP round
    whose remaining share is closest (log scale), if within a factor ``within``."""
    pairs = []
    for m in imp[1:]:
        s = min(sap[1:], key=lambda r: abs(math.log(r["remaining"] / m["remaining"])))
        if abs(math.log(s["remaining"] / m["remaining"])) < math.log(within):
            pairs.append((s, m))
    return pairs


def best_by_val(rounds: list[dict]) -> dict:
    return max(rounds, key=lambda r: (r["val_acc"], -r["remaining"]))


# ----------------------------------------------------------------------------- plots

def _pct_axis(ax, axis: str = "y") -> None:
    """Percent labels; on a log axis, denser major ticks the narrower the range, no minor labels."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    if target.get_scale() == "log":
        lo, hi = sorted(ax.get_ylim() if axis == "y" else ax.get_xlim())
        span = hi / lo
        subs = tuple(range(1, 10)) if span < 5 else (1, 2, 5) if span < 200 else (1,)
        target.set_major_locator(matplotlib.ticker.LogLocator(subs=[float(x) for x in subs]))
        target.set_minor_formatter(matplotlib.ticker.NullFormatter())
        target.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:.3g}%"))
    else:
        target.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0))


def _iteration_axis(ax) -> None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))


def plot_dynamics(results: dict, path: Path) -> None:
    keys = list(results["models"])
    fig, axes = plt.subplots(3, len(keys), figsize=(6.2 * len(keys), 10), squeeze=False, sharex="col")
    for j, key in enumerate(keys):
        res = results["models"][key]
        sap, imp = res["sap"], res["imp"]
        it = [r["iteration"] for r in sap]
        ax = axes[0][j]
        ax.plot(it, [r["pqi"] for r in sap], "o-", color="C0", label="SAP: PQI of trained weights I(w_t)")
        ax.plot(it, [r["init_pqi"] for r in sap], ":", color="C0", label="SAP: PQI of rewound w_init*m_t")
        ax.plot(it, [r["pqi"] for r in imp], "s--", color="0.6", ms=4, label="IMP PQI (reference)")
        pat = res["pqi_pattern"]
        if pat["found"]:
            for i, tag in zip(pat["rounds"], ("min", "max", "min")):
                ax.annotate(tag, (i, sap[i]["pqi"]), textcoords="offset points", xytext=(0, 8),
                            ha="center", color="C3", fontsize=9)
        ax.set_title(f"{res['model']}: PQ Index I(w_t) (p=0.5, q=1, global)")
        ax.set_ylabel("PQI")
        ax.legend(fontsize=9)
        ax = axes[1][j]
        ax.semilogy(it, [r["remaining"] for r in sap], "o-", color="C0", label="SAP")
        ax.semilogy(it, [r["remaining"] for r in imp], "s--", color="0.6", ms=4, label="IMP 20%/round (reference)")
        _pct_axis(ax)
        ax.set_ylabel("remaining weights (log)")
        ax.legend(fontsize=9)
        ax = axes[2][j]
        ax.plot(it, [r["val_acc"] for r in sap], "o-", color="C0", label="SAP val")
        ax.plot(it, [r["test_acc"] for r in sap], "^-", color="C1", label="SAP test")
        _pct_axis(ax)
        ax.set_ylabel("accuracy")
        ax.set_xlabel("iteration t (0 = dense)")
        ax.legend(fontsize=9)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        _iteration_axis(ax)
    fig.suptitle("SAP dynamics on Fashion-MNIST (rewind to init each round)", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_comparison(results: dict, path: Path) -> None:
    keys = list(results["models"])
    fig, axes = plt.subplots(len(keys), 3, figsize=(16, 4.6 * len(keys)), squeeze=False)
    for i, key in enumerate(keys):
        res = results["models"][key]
        for method, style, color in (("sap", "o-", "C0"), ("imp", "s-", "C2")):
            rounds = res[method]
            it = [r["iteration"] for r in rounds]
            rem = [r["remaining"] for r in rounds]
            acc = [r["test_acc"] for r in rounds]
            label = "SAP (p=0.5, q=1)" if method == "sap" else "IMP (20%/round)"
            axes[i][0].plot(it, acc, style, color=color, ms=4, label=label)
            axes[i][1].semilogy(it, rem, style, color=color, ms=4, label=label)
            axes[i][2].plot(rem, acc, style, color=color, ms=4, label=label)
        axes[i][0].set(title=f"{res['model']}: test accuracy vs iteration", xlabel="iteration t")
        axes[i][1].set(title=f"{res['model']}: remaining weights vs iteration", xlabel="iteration t")
        axes[i][2].set(title=f"{res['model']}: test accuracy vs remaining", xlabel="remaining weights (log)")
        axes[i][2].set_xscale("log")
        axes[i][2].invert_xaxis()
        _pct_axis(axes[i][0])
        _pct_axis(axes[i][1])
        _pct_axis(axes[i][2])
        _pct_axis(axes[i][2], "x")
        _iteration_axis(axes[i][0])
        _iteration_axis(axes[i][1])
        for ax in axes[i]:
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=9)
    fig.suptitle("SAP vs iterative magnitude pruning, Fashion-MNIST, same init / epochs / rounds", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def _p(v: float) -> str:
    return f"{100 * v:.2f}%"


def sap_table(res: dict) -> list[str]:
    lines = ["| t | remaining | pruned before | PQI I(w_t) | PQI of `w_init*m_t` | drift from init | val | test |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["sap"]:
        lines.append(f"| {r['iteration']} | {_p(r['remaining'])} | {r['pruned']} | {r['pqi']:.4f} "
                     f"| {r['init_pqi']:.4f} "
                     f"| {r['drift']:.3f} | {_p(r['val_acc'])} | {_p(r['test_acc'])} |")
    return lines


def comparison_table(res: dict) -> list[str]:
    lines = ["| t | SAP remaining | SAP val | SAP test | IMP remaining | IMP PQI | IMP val | IMP test |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s, m in zip(res["sap"], res["imp"]):
        lines.append(f"| {s['iteration']} | {_p(s['remaining'])} | {_p(s['val_acc'])} | {_p(s['test_acc'])} "
                     f"| {_p(m['remaining'])} | {m['pqi']:.4f} | {_p(m['val_acc'])} | {_p(m['test_acc'])} |")
    return lines


def model_observations(key: str, res: dict) -> list[str]:
    sap, imp, pat = res["sap"], res["imp"], res["pqi_pattern"]
    pqi = [r["pqi"] for r in sap]
    out = [f"**{res['model']}**",
           f"- PQI per round (SAP): {', '.join(f'{v:.3f}' for v in pqi)}; steps `{pat['signs']}` (`-` fall, `+` rise, "
           f"`=` change under {PATTERN_TOL}); falls in every round: {'yes' if pat['strictly_falling'] else 'no'}."]
    if pat["found"]:
        i1, i2, i3 = pat["rounds"]
        out.append(f"- Decrease -> increase -> decrease **found**: PQI {pqi[0]:.3f} (t=0) -> {pqi[i1]:.3f} (t={i1}) -> "
                   f"{pqi[i2]:.3f} (t={i2}) -> {pqi[i3]:.3f} (t={i3}), smallest change {pat['strength']:.3f}. "
                   f"Test accuracy at those rounds: {_p(sap[0]['test_acc'])}, {_p(sap[i1]['test_acc'])}, "
                   f"{_p(sap[i2]['test_acc'])}, {_p(sap[i3]['test_acc'])}; remaining {_p(sap[i1]['remaining'])}, "
                   f"{_p(sap[i2]['remaining'])}, {_p(sap[i3]['remaining'])}.")
    else:
        out.append("- Decrease -> increase -> decrease **not found** in this run (no rounds i1<i2<i3 with each change "
                   f"above {PATTERN_TOL}).")
    ipat = res["imp_pqi_pattern"]
    out.append(f"- IMP, which goes to {_p(imp[-1]['remaining'])}, as a probe of the same question: PQI "
               f"{imp[0]['pqi']:.3f} -> min {min(r['pqi'] for r in imp):.3f} -> {imp[-1]['pqi']:.3f} "
               f"(t={imp[-1]['iteration']}), steps `{ipat['signs']}`, largest rise after its minimum "
               f"(t={ipat['min_round']}) {ipat['rise_after_min']:+.4f}; "
               "decrease -> increase -> decrease "
               + (f"found at rounds {ipat['rounds']}." if ipat["found"] else "not found."))
    top = max(sap, key=lambda r: r["test_acc"])
    out.append(f"- Accuracy while SAP's PQI falls: test {_p(sap[0]['test_acc'])} dense, best {_p(top['test_acc'])} at "
               f"t={top['iteration']}, {_p(sap[-1]['test_acc'])} at the end (the hypothesis' first phase expects a "
               "slight rise).")
    first, last = sap[0], sap[-1]
    out.append(f"- PQI of the rewound start point `w_init*m_t`: {first['init_pqi']:.3f} (t=0) -> "
               f"{last['init_pqi']:.3f} "
               f"(t={last['iteration']}); PQI of the trained weights: {first['pqi']:.3f} -> {last['pqi']:.3f}. "
               f"Training moves the masked weights by {min(r['drift'] for r in sap):.2f}-"
               f"{max(r['drift'] for r in sap):.2f} of their initial norm per round.")
    shares = [r["pruned"] / prev["remaining"] / res["prunable"] for prev, r in zip(sap, sap[1:])]
    out.append(f"- SAP's share of the remaining weights pruned per step: {shares[0]:.1%} (first) -> {shares[-1]:.1%} "
               f"(last); with p=0.5, q=1, eta_r=0, gamma=1 it is floor(d*I)/d, i.e. the PQI of the trained weights.")
    t = min(2, len(sap) - 1)
    out.append(f"- After {t} rounds: SAP keeps {_p(sap[t]['remaining'])}, IMP {_p(imp[t]['remaining'])} "
               f"(paper, CIFAR10 CNN: ~49% vs 64%).")
    out.append(f"- Last round (t={sap[-1]['iteration']}): SAP {_p(sap[-1]['remaining'])} remaining, test "
               f"{_p(sap[-1]['test_acc'])}; IMP {_p(imp[-1]['remaining'])} remaining, test {_p(imp[-1]['test_acc'])} "
               f"(dense {_p(sap[0]['test_acc'])}).")
    close = matched_rounds(sap, imp)
    if close:
        diffs = ", ".join(f"{_p(s['remaining'])}/{_p(m['remaining'])}: {100 * (s['test_acc'] - m['test_acc']):+.2f} pt"
                          for s, m in close)
        out.append(f"- At similar sparsity (SAP/IMP remaining within 1.25x), SAP minus IMP test accuracy: {diffs}.")
    for name, rounds in (("SAP", sap), ("IMP", imp)):
        b = best_by_val(rounds)
        out.append(f"- {name} round picked by validation accuracy: t={b['iteration']} ({_p(b['remaining'])} remaining, "
                   f"val {_p(b['val_acc'])}, test {_p(b['test_acc'])}).")
    first = list(res["layers"])[0]
    out.append(f"- First layer `{first}` keeps {_p(sap[-1]['layer_remaining'][first])} (SAP) vs "
               f"{_p(imp[-1]['layer_remaining'][first])} (IMP) at the last round.")
    return out


def summary(results: dict) -> list[str]:
    lines = ["| model | rounds T x epochs E | dense test | SAP last round: remaining / test "
             "| IMP last round: remaining / test | PQI decrease -> increase -> decrease |",
             "|---|---|---:|---:|---:|---|"]
    for res in results["models"].values():
        sap, imp, pat = res["sap"], res["imp"], res["pqi_pattern"]
        lines.append(f"| {res['model']} | {res['iterations']} x {res['epochs']} | {_p(sap[0]['test_acc'])} "
                     f"| {_p(sap[-1]['remaining'])} / {_p(sap[-1]['test_acc'])} "
                     f"| {_p(imp[-1]['remaining'])} / {_p(imp[-1]['test_acc'])} "
                     f"| {'yes, rounds ' + str(pat['rounds']) if pat['found'] else 'no'}"
                     f"{' (PQI falls every round)' if pat['strictly_falling'] else ''} |")
    return lines


def write_markdown(results: dict, out: Path) -> None:
    s, cfg = results["settings"], results["settings"]["sap"]
    lines = [
        "# SAP on Fashion-MNIST: PQ Index dynamics and SAP vs iterative magnitude pruning",
        "",
        f"Measured {results['date']} on {results['machine']['cpu']}, {results['machine']['cores']} cores "
        f"(torch threads: 1), torch {results['machine']['torch']}, Python {results['machine']['python']}, CPU only, "
        f"by `benchmarks/sap_dynamics.py` ({results['runtime_s'] / 60:.1f} min wall"
        + (f", {results['cpu_s'] / 60:.1f} min CPU" if "cpu_s" in results else "")
        + " for both benchmarks; CPU time below wall time means other jobs shared the cores). Reproduce with:",
        "",
        f"    python benchmarks/sap_dynamics.py --out {s['out']}",
        "",
        "Paper: Diao et al., *Pruning Deep Neural Networks from a Sparsity Perspective*, ICLR 2023 "
        "(summary in `PAPERS.md`, section 3).",
        "",
        "## Summary",
        "",
        *summary(results),
        "",
        "## Settings",
        "",
        f"- Data: Fashion-MNIST, seeded subset `limit_train={s['limit_train']}` (seed {s['seed']}): "
        f"{s['n_train']} train / {s['n_val']} validation (carved from train) / {s['n_test']} official test "
        "images, 28x28.",
        "- Models (`trainers/paper_models.py`): `paper:mlp` = 784-128-128-10 with ReLU; `paper:cnn` = 4 stages of "
        f"conv3x3-BN-ReLU(-maxpool), widths {list(paper_models.CNN_WIDTHS)}, global average pool, linear head. "
        "Initialised as the paper's code: Kaiming-normal (fan_out) convs, PyTorch-default linear weights, zero biases.",
        f"- SAP: p={cfg['p']}, q={cfg['q']}, eta_r={cfg['eta_r']}, gamma={cfg['gamma']}, beta={cfg['beta']}, scope "
        f"{cfg['scope']}; `trainers.sap.sap_step`. Algorithm 1: dense round 0, then each round prunes from the "
        "previous round's trained weights, rewinds the survivors to w_init and retrains. w_init: the SAP policy's "
        "`_init_state` (seeded `reset_parameters`); it equals `build_model`'s init under the same seed for both "
        "models: "
        + ", ".join(f"{k} {v['w_init_matches_build']}" for k, v in results["models"].items()) + ".",
        f"- IMP: remove {IMP_RATE:.0%} of the remaining weights per round, global magnitude, same rewind, init, data "
        "order, epochs and rounds. Round 0 (dense) is the same run for both methods.",
        "- Training per round: SGD lr 0.1, momentum 0.9, weight decay 5e-4, Nesterov, batch 250, cosine annealing to 0 "
        "over the round (the paper's recipe); the round's network is its last epoch. Masks cover conv/linear "
        "weights only (dim > 1); biases and BatchNorm are not pruned; PQI is over all unmasked masked-tensor weights.",
        "- Remaining = share of the prunable (conv/linear) weights still unmasked while the round trains.",
        "",
        "## Scaling against the paper",
        "",
        "| | paper | here |",
        "|---|---|---|",
    ]
    for key, res in results["models"].items():
        lines.append(f"| {res['model']} epochs per round E | {PAPER['epochs']} | {res['epochs']} "
                     f"({PAPER['epochs'] / res['epochs']:.0f}x fewer) |")
        lines.append(f"| {res['model']} rounds T | {PAPER['iterations']} | {res['iterations']} |")
    lines += [
        f"| CNN widths | {list(paper_models.PAPER_CNN_WIDTHS)} | {list(paper_models.CNN_WIDTHS)} "
        f"(/{paper_models.CNN_WIDTH_DIVISOR}, {results['models'].get('cnn', {}).get('prunable', 0):,} "
        "prunable weights) |",
        f"| training images | 60,000 | {s['n_train']:,} (+{s['n_val']:,} validation) |",
        "| seeds | several | 1 (seed 0) |",
        "| dataset of Fig. 2 | CIFAR10 | Fashion-MNIST |",
        "",
    ]
    for key, res in results["models"].items():
        lines += [f"## {res['model']} ({res['params']:,} parameters, {res['prunable']:,} prunable)", "",
                  f"SAP dynamics (E={res['epochs']}, T={res['iterations']}). *pruned before*: weights the SAP step "
                  "removed from the previous round's trained network; *PQI of `w_init*m_t`*: the PQ Index of the "
                  "rewound weights this round starts from; *drift*: relative L2 change of the masked tensors "
                  "during the round's training.", "",
                  *sap_table(res), "", "SAP vs IMP (round 0 is the shared dense run):", "",
                  *comparison_table(res), ""]
    lines += ["## Plots", "",
              "![PQI dynamics](sap_pqi_dynamics.png)", "",
              "`sap_pqi_dynamics.png`: per model, SAP's PQI, remaining weights and validation/test accuracy per round "
              "(IMP's PQI and remaining in grey for reference).", "",
              "![SAP vs IMP](sap_vs_imp.png)", "",
              "`sap_vs_imp.png`: test accuracy vs round, remaining vs round, test accuracy vs remaining.", "",
              "## Observations (generated from the numbers above)", ""]
    for key, res in results["models"].items():
        lines += model_observations(key, res) + [""]
    lines += ["## Comparison with the paper", "", *results.get("discussion", []), ""]
    out.write_text("\n".join(lines))


def pqi_mechanism(res: dict) -> str:
    """Whether the falling PQI follows the rewound start point (truncated init) or comes from training."""
    sap = res["sap"]
    first, last = sap[0], sap[-1]
    init_change, trained_change = last["init_pqi"] - first["init_pqi"], last["pqi"] - first["pqi"]
    gaps = [r["pqi"] - r["init_pqi"] for r in sap[1:]]
    drift = sum(r["drift"] for r in sap) / len(sap)
    head = (f"{res['model']}: trained PQI {first['pqi']:.3f} -> {last['pqi']:.3f}, start-point PQI "
            f"{first['init_pqi']:.3f} -> {last['init_pqi']:.3f}, mean drift {drift:.2f} of the init norm. ")
    if abs(init_change) < 0.3 * abs(trained_change):
        below = next((r["iteration"] for r in sap if r["pqi"] < r["init_pqi"]), None)
        return head + ("The start point's PQI barely moves (the mask does not pick out large init values, since "
                       "training moves the weights by about their own norm), so the decline comes from training: the "
                       "retrained survivors end up more even in magnitude"
                       + (f", below the init's PQI from round {below} on." if below is not None else "."))
    return head + ("The start point's PQI falls with it: the survivors are mostly the weights whose init values were "
                   "large, and that truncated init distribution is more even; training keeps the trained PQI within "
                   f"{min(gaps):+.3f}..{max(gaps):+.3f} of it.")


def discussion(results: dict) -> list[str]:
    """Paper-vs-here statements built from the measured numbers (single seed, scaled-down training)."""
    out = ["Paper (PAPERS.md, Fig. 2, CIFAR10 CNN, global scope, T=30): SAP(0.5, 1) ends at ~77% retrained accuracy vs "
           "~82% for lottery-ticket IMP; SAP prunes faster early (~49% left at T=2 vs 64%); PQI hypothesised to "
           "decrease (regularisation), increase (compression), then decrease at collapse.", ""]
    for key, res in results["models"].items():
        sap, imp = res["sap"], res["imp"]
        t2 = min(2, len(sap) - 1)
        faster = sap[t2]["remaining"] < imp[t2]["remaining"]
        last_gap = 100 * (sap[-1]["test_acc"] - imp[-1]["test_acc"])
        pairs = matched_rounds(sap, imp)
        matched = (f" At matched sparsity ({len(pairs)} pairs within 1.25x) SAP minus IMP test accuracy averages "
                   f"{sum(100 * (a['test_acc'] - b['test_acc']) for a, b in pairs) / len(pairs):+.2f} pt."
                   if pairs else "")
        out.append(f"- {res['model']}: early pruning speed {'matches' if faster else 'does not match'} the paper "
                   f"(t={t2}: SAP {_p(sap[t2]['remaining'])} vs IMP {_p(imp[t2]['remaining'])}). At the last round "
                   f"SAP is {abs(last_gap):.2f} pt {'below' if last_gap < 0 else 'above'} IMP in test accuracy while "
                   f"keeping {_p(sap[-1]['remaining'])} vs {_p(imp[-1]['remaining'])} of the weights.{matched} "
                   f"PQI pattern: {'appears' if res['pqi_pattern']['found'] else 'does not appear'} "
                   f"(steps `{res['pqi_pattern']['signs']}`).")
    models = results["models"].values()
    monotone = all(r["pqi_pattern"].get("strictly_falling") for r in models)
    beta_binds = any(r["pqi"] >= results["settings"]["sap"]["beta"] for res in models for r in res["sap"])
    out += ["", "How SAP's step size behaves here: with p=0.5, q=1, eta_r=0, gamma=1, Theorem 2 gives r_t/d_t = "
            "1 - I(w_t), so each step prunes the share I(w_t) of the weights left"
            f"{'' if beta_binds else ' (the beta cap never binds)'}. "
            "SAP therefore prunes fast only while the retrained survivors stay sparse in the PQI sense. "
            + ("Here I(w_t) falls every round for every model, so the steps shrink round after round and SAP slows "
               "down instead of reaching the compression and collapse phases of the hypothesis within T rounds."
               if monotone else "Here I(w_t) does not fall monotonically; see the steps above.")]
    for key, res in results["models"].items():
        out.append("- " + pqi_mechanism(res))
    s = results["settings"]
    scale = sorted({PAPER["epochs"] / r["epochs"] for r in results["models"].values()})
    out += ["", f"Caveats: one seed, {s['n_train']:,} training images and "
            f"{'-'.join(f'{x:.0f}' for x in scale)}x fewer epochs per round than the paper (and a CNN 4x narrower). "
            "The number of epochs sets how far the weights move from their init and how long weight decay acts on "
            "the unimportant ones, hence their magnitude distribution, the PQI and SAP's step sizes; whether the "
            "paper's 200 epochs per round give a higher PQI (and SAP's faster early pruning) was not tested here. "
            "Differences of a few tenths of a point are within run-to-run noise "
            f"on a {s['n_test']:,}-image test set (one standard error ~0.3 pt at 90% accuracy)."]
    return out


# ----------------------------------------------------------------------------- main

def per_model(values: list[int], models: list[str], flag: str) -> dict[str, int]:
    if len(values) == 1:
        return {m: values[0] for m in models}
    if len(values) != len(models):
        raise SystemExit(f"{flag}: give one value or one per model ({len(models)})")
    return dict(zip(models, values))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for sap.md, sap.json and plots")
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--iterations", type=int, nargs="+", default=[20, 10], help="T per model (one value: all)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[15, 5], help="E per round per model (one value: all)")
    ap.add_argument("--limit-train", type=int, default=10000, help="seeded training subset (validation carved from it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only rewrite sap.md and the plots from --out/sap.json")
    ap.add_argument("--data-root", type=Path, default=FASHION_MNIST)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        write_outputs(json.loads((args.out / "sap.json").read_text()), args.out)
        print(f"rewrote {args.out}/sap.md and the plots from {args.out}/sap.json")
        return
    torch.set_num_threads(1)
    iterations = per_model(args.iterations, args.models, "--iterations")
    epochs = per_model(args.epochs, args.models, "--epochs")
    cfg = SAPConfig(p=0.5, q=1.0, eta_r=0.0, gamma=1.0, beta=0.9, scope="global")
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as cache:
        splits = load_splits(DataConfig(name="fashion-mnist", root=args.data_root, limit_train=args.limit_train),
                             seed=args.seed, cache_dir=Path(cache))
    results = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "settings": {"out": str(args.out), "limit_train": args.limit_train, "seed": args.seed,
                     "n_train": len(splits.train), "n_val": len(splits.val), "n_test": len(splits.test),
                     "sap": cfg.model_dump(), "imp_rate": IMP_RATE},
        "models": {},
    }
    for key in args.models:
        results["models"][key] = run_model(key, splits, iterations=iterations[key], epochs=epochs[key],
                                           cfg=cfg, seed=args.seed)
    results["runtime_s"] = time.perf_counter() - t0
    results["cpu_s"] = time.process_time() - c0
    write_outputs(results, args.out)
    print(f"wrote {args.out}/sap.md, sap.json, sap_pqi_dynamics.png, sap_vs_imp.png "
          f"in {results['runtime_s'] / 60:.1f} min")


def write_outputs(results: dict, out: Path) -> None:
    """Analysis (PQI pattern, discussion), then sap.json, the plots and sap.md."""
    for res in results["models"].values():
        res["pqi_pattern"] = pqi_pattern([r["pqi"] for r in res["sap"]])
        res["imp_pqi_pattern"] = pqi_pattern([r["pqi"] for r in res["imp"]])
    results["discussion"] = discussion(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sap.json").write_text(json.dumps(results, indent=1))
    plot_dynamics(results, out / "sap_pqi_dynamics.png")
    plot_comparison(results, out / "sap_vs_imp.png")
    write_markdown(results, out / "sap.md")


if __name__ == "__main__":
    main()
