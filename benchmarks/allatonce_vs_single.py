"""`allatonce` (layer OR filter per iteration, chosen by CKA) against layer-only and
filter-only pruning of a CIFAR-style ResNet-20 on real Fashion-MNIST (CPU, one thread).

The three arms are the same `allatonce` policy with only `candidates` changed ("both", "layer",
"filter"): same parent, data, MACs target, `min_blocks`, recovery / iteration / final
fine-tune epochs and seed. For every arm it records each policy iteration (choice, both
candidates' CKA to the network they came from, MACs, validation accuracy after the iteration's fine-tune) and
the final subnet: MACs, params, batch-1 CPU latency (re-measured at the end, interleaved with
the parent, so the ratio to the parent comes from the same conditions), validation accuracy
before and after the final fine-tune and test accuracy. An optional second, lower target is
run for the two arms that can reach it (layer-only cannot go below its floor: every removable
block gone down to `min_blocks` per stage; the floor is measured with a zero-epoch run).

Epochs are scaled down from the paper's 10 recovery + 190 per iteration (see --recovery-epochs,
--iteration-epochs, --final-epochs). Writes allatonce.json, allatonce.png and allatonce.md to
--out (hand-written text between the `<!-- observations -->` markers of an existing
allatonce.md is kept).

    . /work/venv/bin/activate
    python benchmarks/allatonce_vs_single.py --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
import warnings
from pathlib import Path

import torch

from prunetune.spaces import PruningVector, describe, measure_full_cost
from prunetune.spaces.cost import CostConfig
from prunetune.trainers.data import DataConfig, load_splits, probe_indices
from prunetune.trainers.parent import get_parent
from prunetune.trainers.policies import make_policy
from prunetune.trainers.recipe import TrainRecipe
from prunetune.trainers.trial import CandidateSetup, Epoch, Finished, Iteration, Materialized, run_candidate
from machine import FASHION_MNIST, cpu_name  # noqa: E402  (benchmarks/machine.py)

MODEL = "cifar:resnet20"
ARMS = {"both": "allatonce (layer or filter)", "layer": "layer-only", "filter": "filter-only"}
PAPER_RECOVERY, PAPER_ITERATION = 10, 190


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--data-root", type=Path, default=FASHION_MNIST)
    p.add_argument("--cache", type=Path, default=Path("/tmp/prunetune-allatonce-cache"),
                   help="parent and data cache (the trained parent is reused across runs)")
    p.add_argument("--limit-train", type=int, default=10000, help="seeded training pool (10%% becomes validation)")
    p.add_argument("--parent-epochs", type=int, default=5)
    p.add_argument("--target", type=float, default=0.31, help="MACs target as a share of the parent's, all arms")
    p.add_argument("--second-target", type=float, default=0.0,
                   help="lower target for allatonce and filter-only only (0 = skip)")
    p.add_argument("--min-blocks", type=int, default=1)
    p.add_argument("--recovery-epochs", type=int, default=1)
    p.add_argument("--iteration-epochs", type=int, default=2)
    p.add_argument("--final-epochs", type=int, default=3)
    p.add_argument("--probes", type=int, default=256, help="validation images for CKA and the KL block score")
    p.add_argument("--latency-rounds", type=int, default=7)
    p.add_argument("--latency-repeats", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", action="store_true",
                   help="only redraw allatonce.png and allatonce.md from an existing allatonce.json in --out")
    return p.parse_args()


def load_data(args):
    cfg = DataConfig(name="fashion-mnist", root=args.data_root, limit_train=args.limit_train)
    splits = load_splits(cfg, seed=args.seed, cache_dir=args.cache)
    idx = probe_indices(len(splits.val), args.probes, args.seed)
    probes = torch.stack([splits.val[int(i)][0] for i in idx])
    return cfg, splits, probes


def policy_params(args, candidates: str, target: float, *, epochs: bool = True) -> dict:
    """The arm's policy: everything but `candidates` (and the target) is shared."""
    return {"target_macs_ratio": target, "match": "macs", "layer_criterion": "kl", "filter_importance": "l1",
            "filter_groups": "internal", "cka_layer": "penultimate", "min_blocks": args.min_blocks,
            "recovery_epochs": args.recovery_epochs if epochs else 0,
            "iteration_epochs": args.iteration_epochs if epochs else 0,
            "max_iterations": 20, "candidates": candidates}


def make_setup(args, parent, parent_id, splits, probes, params: dict, final_epochs: int) -> CandidateSetup:
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    return CandidateSetup(parent=parent, parent_id=parent_id, splits=splits, probes=probes,
                          vector=PruningVector(), recipe=TrainRecipe(epochs=final_epochs),
                          model_name=MODEL, seed=args.seed, structure=describe(parent, example),
                          cost=CostConfig(latency=True, threads=1, repeats=args.latency_repeats, batch=1),
                          policy=make_policy("allatonce", params))


def run_arm(setup: CandidateSetup, label: str) -> tuple[dict, torch.nn.Module]:
    """Consume one trial's events; print progress; return its record and the final subnet."""
    t0 = time.perf_counter()
    rec: dict = {"iterations": [], "final_epochs": []}
    subnet = None
    for ev in run_candidate(setup):
        if isinstance(ev, Iteration):
            m = ev.metrics
            row = {"step": ev.step, **m, "choice": ev.info["choice"], "removed": ev.info["removed"],
                   "seconds": ev.seconds}
            rec["iterations"].append(row)
            ckas = "  ".join(f"cka_{k}={m[f'cka_{k}']:.4f}" for k in ("layer", "filter") if f"cka_{k}" in m)
            print(f"[{label}] it {ev.step}: {row['choice']:6s} ({row['removed']})  {ckas}  "
                  f"MACs {m['macs'] / 1e6:.2f}M ({m['macs_ratio']:.3f})  val {m['val_acc']:.4f}  {ev.seconds:.0f}s",
                  flush=True)
        elif isinstance(ev, Materialized):
            rec.update(macs=ev.cost.macs, params=ev.cost.params, latency_ms_in_trial=ev.cost.latency_ms,
                       cka_before_finetune=ev.cka.get("penultimate"), val_acc_before_finetune=ev.val_acc)
            print(f"[{label}] materialized: MACs {ev.cost.macs / 1e6:.2f}M params {ev.cost.params} "
                  f"val before fine-tune {ev.val_acc:.4f}", flush=True)
        elif isinstance(ev, Epoch):
            rec["final_epochs"].append({"epoch": ev.stats.epoch, "val_acc": ev.stats.val_acc,
                                        "train_loss": ev.stats.train_loss, "seconds": ev.stats.seconds})
        elif isinstance(ev, Finished):
            rec["test_acc"] = ev.test_acc
            subnet = ev.subnet.module.eval()
    rec["val_acc_after_finetune"] = rec["final_epochs"][-1]["val_acc"] if rec["final_epochs"] else None
    rec["seconds"] = time.perf_counter() - t0
    print(f"[{label}] done: val {rec['val_acc_after_finetune']} test {rec['test_acc']:.4f} "
          f"in {rec['seconds']:.0f}s", flush=True)
    return rec, subnet


def epochs_trained(rec: dict, args, candidates: str) -> dict:
    """Epochs in the final network's own history, and epochs of compute (both candidates)."""
    n = len(rec["iterations"])
    per_iter_net = args.recovery_epochs + args.iteration_epochs
    per_iter_compute = per_iter_net + (args.recovery_epochs if candidates == "both" else 0)
    if candidates == "both":  # iterations with only one candidate left (no removable block) cost less
        singles = sum(1 for r in rec["iterations"] if "cka_layer" not in r or "cka_filter" not in r)
        compute = n * per_iter_compute - singles * args.recovery_epochs
    else:
        compute = n * per_iter_compute
    return {"final_net": n * per_iter_net + args.final_epochs, "compute": compute + args.final_epochs}


def layer_floor(args, parent, parent_id, splits, probes) -> float:
    """Lowest MACs ratio layer-only can reach (zero-epoch run: training does not change MACs)."""
    setup = make_setup(args, parent, parent_id, splits, probes,
                       policy_params(args, "layer", 0.01, epochs=False), final_epochs=0)
    ratios = [ev.metrics["macs_ratio"] for ev in run_candidate(setup) if isinstance(ev, Iteration)]
    return min(ratios) if ratios else 1.0


def remeasure_latency(models: dict[str, torch.nn.Module], example: torch.Tensor, rounds: int, repeats: int) -> dict:
    """Batch-1 median latency per model, interleaved over rounds; median of the round medians."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            c = measure_full_cost(model.eval(), example, batch=1, latency=True, threads=1,
                                  repeats=repeats, warmup=10)
            times[name].append(c.latency_ms)
    return {k: {"median_ms": statistics.median(v), "rounds_ms": v} for k, v in times.items()}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.lines import Line2D

    colors = {"both": "tab:red", "layer": "tab:blue", "filter": "tab:green"}
    parent, runs, main_target = result["parent"], result["runs"], result["settings"]["target"]
    fig, axes = plt.subplot_mosaic([["acc", "acc"], ["cka", "lat"]], figsize=(14, 10.5), layout="constrained",
                                   height_ratios=[1.15, 1])
    ax, bx, lx = axes["acc"], axes["cka"], axes["lat"]
    for run in runs:
        color, style = colors[run["candidates"]], "-" if run["target"] == main_target else "--"
        xs = [1.0] + [r["macs_ratio"] for r in run["iterations"]]
        ys = [parent["val_acc"]] + [r["val_acc"] for r in run["iterations"]]
        ax.plot(xs, ys, style, marker="o", ms=4, color=color, alpha=0.8)
        fx = run["macs"] / parent["macs"]
        ax.scatter([fx], [run["test_acc"]], marker="*", s=240, color=color, edgecolor="black", zorder=5)
        ax.annotate(f"{100 * run['test_acc']:.2f}", (fx, run["test_acc"]), xytext=(9, -3),
                    textcoords="offset points", fontsize=8, color=color)
        lx.scatter([fx], [run["latency_ms"]], s=90, color=color, edgecolor="black", zorder=5,
                   marker="o" if run["target"] == main_target else "D")
    ax.scatter([1.0], [parent["test_acc"]], marker="*", s=240, color="gray", edgecolor="black", zorder=5)
    for tgt in {r["target"] for r in runs}:
        ax.axvline(tgt, color="gray", lw=0.8, ls=":")
        ax.annotate(f"target {tgt:g}", (tgt, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="gray")
    lowest = min(min(r["macs_ratio"] for r in run["iterations"]) for run in runs)
    ax.set_xlim(1.03, lowest - 0.05)  # reversed: more pruning to the right
    ax.set_xlabel("MACs / parent MACs (more pruning to the right)")
    ax.set_ylabel("accuracy")
    ax.set_title("ResNet-20 on Fashion-MNIST: accuracy vs MACs")
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=3, label=ARMS[k]) for k, c in colors.items()]
    handles += [Line2D([], [], color="gray", lw=3, label="parent"),
                Line2D([], [], color="k", marker="o", ms=4, label=f"val acc after each iteration's fine-tune ({result['data']['val']} images)"),
                Line2D([], [], color="k", marker="*", ms=13, ls="", label="test acc after the final fine-tune"),
                Line2D([], [], color="k", ls="-", label=f"target {main_target:g} (all arms)")]
    if any(r["target"] != main_target for r in runs):
        second = next(r["target"] for r in runs if r["target"] != main_target)
        handles.append(Line2D([], [], color="k", ls="--", label=f"target {second:g} (layer-only cannot reach)"))
    ax.legend(handles=handles, fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5))

    both = [r for r in runs if r["candidates"] == "both"]
    if both:
        run = max(both, key=lambda r: len(r["iterations"]))
        its = run["iterations"]
        steps = [r["step"] for r in its]
        for kind, mk in (("layer", "s"), ("filter", "^")):
            pts = [(r["step"], r[f"cka_{kind}"]) for r in its if f"cka_{kind}" in r]
            if pts:
                bx.plot(*zip(*pts), marker=mk, color=colors[kind], label=f"{kind} candidate CKA")
        for r in its:
            bx.annotate(r["choice"][0].upper(), (r["step"], r[f"cka_{r['choice']}"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=9, weight="bold")
        bx.set_xticks(steps)
        bx.margins(y=0.1)
        bx.set_xlabel("allatonce iteration (letter = chosen candidate)")
        bx.set_ylabel("linear CKA to the current network (penultimate)")
        bx.set_title(f"allatonce candidates, target {run['target']:g}")
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    lx.scatter([1.0], [parent["latency_ms"]], s=90, color="gray", edgecolor="black", zorder=5)
    lx.invert_xaxis()
    lx.set_ylim(bottom=0)
    lx.set_xlabel("MACs / parent MACs")
    lx.set_ylabel("CPU latency, batch 1, 1 thread (ms)")
    lx.set_title("final networks: latency vs MACs")
    lx.grid(alpha=0.3)
    lx.legend(handles=[Line2D([], [], color="k", marker="o", ls="", label=f"target {main_target:g} (and parent)"),
                       Line2D([], [], color="k", marker="D", ls="", label="second target")], fontsize=8)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def command_line(settings: dict) -> str:
    """The command that reproduces a run, every option spelled out."""
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if k != "replot")
    return f"python benchmarks/allatonce_vs_single.py {opts}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def render(result: dict, observations: str) -> str:
    s, m, par = result["settings"], result["machine"], result["parent"]
    lines = [
        "# `allatonce` vs layer-only vs filter-only pruning (ResNet-20, Fashion-MNIST)", "",
        f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores (1 torch thread), torch {m['torch']}, "
        f"Python {m['python']}, CPU only, by `benchmarks/allatonce_vs_single.py` in {result['seconds'] / 60:.1f} min "
        f"(parent {result['parent_seconds']:.0f} s, {par['source']}).", "",
        "Command:", "", "```", command_line(s), "```", "",
        "## Settings", "",
        f"- Model `{MODEL}` (1 input channel, 28x28 inputs), parent trained {s['parent_epochs']} epochs "
        f"(SGD 0.05 cosine, batch 128) on a seeded {s['limit_train']}-image subset of the Fashion-MNIST "
        f"training set ({result['data']['train']} train / {result['data']['val']} validation); "
        f"test = the official {result['data']['test']}-image test set.",
        f"- Policy `allatonce`, identical for all arms except `candidates`: match=macs, layer_criterion=kl, "
        f"filter_importance=l1, filter_groups=internal, cka_layer=penultimate on {s['probes']} validation "
        f"probes, min_blocks={s['min_blocks']}, seed {s['seed']}.",
        f"- MACs target {s['target']} x parent for all three arms"
        + (f"; second target {s['second_target']} for allatonce and filter-only (layer-only floor = "
           f"{result['layer_floor']:.3f} x parent, so it cannot reach it)." if s.get("second_target") else "."),
        f"- Latency: batch 1, 1 thread, median of {s['latency_repeats']} runs, median over "
        f"{s['latency_rounds']} rounds interleaved with the parent after all training.", "",
        "## Epoch scaling", "",
        "| phase | paper | here | factor |", "|---|---|---|---|",
        f"| recovery fine-tune of each candidate | {PAPER_RECOVERY} | {s['recovery_epochs']} | "
        f"1/{PAPER_RECOVERY / max(s['recovery_epochs'], 1):g} |",
        f"| fine-tune of the winner per iteration | {PAPER_ITERATION} | {s['iteration_epochs']} | "
        f"1/{PAPER_ITERATION / max(s['iteration_epochs'], 1):g} |",
        f"| total per iteration (winner) | {PAPER_RECOVERY + PAPER_ITERATION} | "
        f"{s['recovery_epochs'] + s['iteration_epochs']} | "
        f"1/{(PAPER_RECOVERY + PAPER_ITERATION) / max(s['recovery_epochs'] + s['iteration_epochs'], 1):.3g} |",
        f"| final fine-tune (after the last iteration) | none (the last iteration's 190) | {s['final_epochs']} | |",
        "| epoch size | 3 augmented copies of CIFAR-10 train (150k images) | "
        f"{result['data']['train']} images, no augmentation | |", "",
        "## Results", "",
        f"Parent: {par['macs'] / 1e6:.2f} M MACs, {par['params']} params, {par['latency_ms']:.3f} ms, "
        f"val {_pct(par['val_acc'])} %, test {_pct(par['test_acc'])} %.", "",
        "| arm | target | final MACs (M) | % of parent | params | latency ms (x parent) | val before final FT % "
        "| val after final FT % | test % | iterations | choices | epochs: final net / compute | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lat = r["latency_ms"]
        choices = " ".join(it["choice"][0].upper() for it in r["iterations"])
        lines.append(
            f"| {ARMS[r['candidates']]} | {r['target']:g} | {r['macs'] / 1e6:.2f} | {100 * r['macs'] / par['macs']:.1f} | "
            f"{r['params']} | {lat:.3f} ({lat / par['latency_ms']:.2f}) | {_pct(r['val_acc_before_finetune'])} | "
            f"{_pct(r['val_acc_after_finetune'])} | {_pct(r['test_acc'])} | {len(r['iterations'])} | {choices} | "
            f"{r['epochs']['final_net']} / {r['epochs']['compute']} | {r['seconds']:.0f} |")
    if s.get("second_target"):
        lines.append(f"| layer-only | {s['second_target']:g} | cannot reach: floor {result['layer_floor']:.3f} x "
                     "parent | | | | | | | | | | |")
    lines += ["", "Choices: L = layer (block removed), F = filter (channels removed). Epochs \"final net\" = "
              "recovery + iteration epochs of every winner + final fine-tune; \"compute\" also counts the "
              "losing candidate's recovery.", "", "### Per iteration", ""]
    for r in result["runs"]:
        lines += [f"**{ARMS[r['candidates']]}, target {r['target']:g}**", "",
                  "| it | choice | removed | CKA layer | CKA filter | MACs layer cand. | MACs filter cand. | "
                  "MACs ratio | val % after iteration FT |", "|---|---|---|---|---|---|---|---|---|"]
        for it in r["iterations"]:
            def f(k, fmt):
                return format(it[k], fmt) if k in it else "-"
            lines.append(f"| {it['step']} | {it['choice']} | {it['removed']} | {f('cka_layer', '.4f')} | "
                         f"{f('cka_filter', '.4f')} | {f('macs_layer', ',.0f')} | {f('macs_filter', ',.0f')} | "
                         f"{it['macs_ratio']:.3f} | {_pct(it['val_acc'])} |")
        lines.append("")
    lines += ["![accuracy vs MACs](allatonce.png)", "",
              "Left: validation accuracy after each iteration's fine-tune vs MACs (solid: main target, dashed: "
              "second target), stars = test accuracy after the final fine-tune. Right: CKA of the two "
              "allatonce candidates per iteration.", "",
              "## Observations", "", "<!-- observations -->", observations.strip(), "<!-- /observations -->", ""]
    return "\n".join(lines)


def kept_observations(md: Path) -> str:
    if md.exists():
        found = re.search(r"<!-- observations -->\n(.*?)<!-- /observations -->", md.read_text(), re.S)
        if found:
            return found.group(1)
    return "(to be written after looking at the numbers)"


def main() -> None:
    warnings.simplefilter("ignore")
    args = parse_args()
    if args.replot:
        write_reports(json.loads((args.out / "allatonce.json").read_text()), args.out)
        return
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data_cfg, splits, probes = load_data(args)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)

    t0 = time.perf_counter()
    parent, info = get_parent(MODEL, data_cfg, splits, TrainRecipe(epochs=args.parent_epochs), seed=args.seed,
                              cache_dir=args.cache,
                              on_epoch=lambda st: print(f"[parent] epoch {st.epoch} val {st.val_acc:.4f}", flush=True))
    parent_seconds = time.perf_counter() - t0
    pcost = measure_full_cost(parent, example, batch=1, latency=False)
    print(f"parent ({info.source}): val {info.val_acc:.4f} test {info.test_acc:.4f} MACs {pcost.macs}", flush=True)

    floor = layer_floor(args, parent, info.parent_id, splits, probes)
    print(f"layer-only floor at min_blocks={args.min_blocks}: {floor:.3f} x parent MACs", flush=True)
    if floor > args.target:
        raise SystemExit(f"--target {args.target} is below what layer-only can reach ({floor:.3f})")

    plan = [(c, args.target) for c in ARMS]
    if args.second_target:
        plan += [(c, args.second_target) for c in ("both", "filter")]
    runs, subnets = [], {}
    for cand, target in plan:
        label = f"{cand}@{target:g}"
        setup = make_setup(args, parent, info.parent_id, splits, probes, policy_params(args, cand, target),
                           args.final_epochs)
        rec, subnet = run_arm(setup, label)
        rec.update(candidates=cand, target=target, epochs=epochs_trained(rec, args, cand))
        runs.append(rec)
        subnets[label] = subnet

    lat = remeasure_latency({"parent": parent, **subnets}, example, args.latency_rounds, args.latency_repeats)
    for rec in runs:
        rec["latency_ms"] = lat[f"{rec['candidates']}@{rec['target']:g}"]["median_ms"]
        rec["latency_rounds_ms"] = lat[f"{rec['candidates']}@{rec['target']:g}"]["rounds_ms"]
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(), "date": datetime.date.today().isoformat()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "parent": {"val_acc": info.val_acc, "test_acc": info.test_acc, "source": info.source,
                   "macs": pcost.macs, "params": pcost.params, "latency_ms": lat["parent"]["median_ms"],
                   "latency_rounds_ms": lat["parent"]["rounds_ms"]},
        "parent_seconds": parent_seconds,
        "layer_floor": floor,
        "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    (args.out / "allatonce.json").write_text(json.dumps(result, indent=2))
    write_reports(result, args.out)
    print(f"wrote {args.out}/allatonce.{{json,png,md}} in {result['seconds'] / 60:.1f} min", flush=True)


def write_reports(result: dict, out: Path) -> None:
    plot(result, out / "allatonce.png")
    md = out / "allatonce.md"
    md.write_text(render(result, kept_observations(md)))


if __name__ == "__main__":
    main()
