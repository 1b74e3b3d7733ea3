"""`prunetune` command line: search, front, prune, verify, pick; cluster, launch, jobs (see cluster/cli.py).

Exit codes: 0 success, 1 the search ran but failed, 2 bad input (config, arguments,
unknown experiment). Heavy imports (torch, ray, mlflow) happen only after the input is valid.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from rich.console import Console

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunetune", description="Search for deployable pruned subnetworks.")
    p.add_argument("--version", action="version", version=f"prunetune {version('prunetune')}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="run a pruning search from an experiment YAML")
    s.add_argument("config", help="experiment YAML (see docs/config.md)")
    s.add_argument("--resume", action="store_true",
                   help="continue this config's unfinished search (finished trials are kept, not rerun)")
    f = sub.add_parser("front", help="print the Pareto front of an experiment's latest search")
    f.add_argument("experiment", help="MLflow experiment name (the config's `name` by default)")
    f.add_argument("--tracking-uri", default=None, help="default: sqlite:///mlflow.db in this folder")
    pr = sub.add_parser("prune", help="prune one model into DIR: spec, weights, TorchScript, ONNX, cost")
    pr.add_argument("model", help="cifar:resnet56, torchvision:NAME, or a module:function factory")
    pr.add_argument("--out", required=True, help="output folder (created; must be empty)")
    how = pr.add_mutually_exclusive_group()
    how.add_argument("--channel-ratio", type=float, default=None, help="keep ratio for every channel stage")
    how.add_argument("--vector", default=None, help="YAML/JSON PruningVector (channels/depth/heads/resolution)")
    pr.add_argument("--head-ratio", type=float, default=None, help="keep ratio for attention heads")
    pr.add_argument("--drop-blocks", type=int, default=0, help="removable blocks dropped per stage")
    pr.add_argument("--resolution", type=int, default=None, help="input resolution of the subnet")
    pr.add_argument("--checkpoint", default=None, help="parent weights (state_dict or .safetensors)")
    pr.add_argument("--in-channels", type=int, default=3)
    pr.add_argument("--num-classes", type=int, default=10)
    pr.add_argument("--input-size", type=int, default=None, help="parent input size (default 32 cifar, 224 otherwise)")
    pr.add_argument("--importance", default="l2", help="channel criterion: l1, l2, group_l2, bn_scale, taylor, random")
    pr.add_argument("--block-criterion", default="position", help="which blocks go first: position, weight_norm, kl, cka (kl/cka use random probes here)")
    pr.add_argument("--round-to", type=int, default=1, help="keep channel counts at multiples of this")
    pr.add_argument("--batch", type=int, default=8, help="batch size of the second latency measurement")
    pr.add_argument("--repeats", type=int, default=20, help="timed runs per latency measurement")
    v = sub.add_parser("verify", help="rebuild DIR's subnet from spec + weights; check the exports agree")
    v.add_argument("dir")
    pk = sub.add_parser("pick", help="choose a subnet from an experiment's front: rebuild, re-test, export to "
                                     "DIR, register it in the MLflow Model Registry")
    pk.add_argument("experiment", help="MLflow experiment name (the config's `name` by default)")
    pk.add_argument("--max-macs", type=float, default=None, metavar="M", help="most MACs allowed, e.g. 2e6")
    pk.add_argument("--max-latency-ms", type=float, default=None, metavar="L",
                    help="highest latency (batch 1, as measured by the search) allowed, in ms")
    pk.add_argument("--min-accuracy", type=float, default=None, metavar="A",
                    help="lowest validation accuracy allowed, in [0, 1]")
    pk.add_argument("--model-name", default=None, help="registered model name (default: EXPERIMENT-subnet)")
    pk.add_argument("--tracking-uri", default=None, help="default: sqlite:///mlflow.db in this folder")
    pk.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must be empty)")
    from prunetune.cluster.cli import add_subcommands

    add_subcommands(sub)  # cluster up|down|status, launch, jobs list|logs|stop
    return p


def cmd_search(args, console: Console) -> int:
    from prunetune.search.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        console.print(f"[red]config error[/] {err}", highlight=False)
        return EXIT_BAD_INPUT
    from prunetune.search.front import print_front
    from prunetune.search.resume import NothingToResume
    from prunetune.search.runner import run_search
    try:
        outcome = run_search(cfg, console=console, resume=args.resume)
    except NothingToResume as err:
        console.print(f"[red]cannot resume[/] {err}", highlight=False)
        return EXIT_BAD_INPUT
    uri = outcome.target.uri
    print_front(outcome.front_doc, console, title=f"{cfg.name}: Pareto front")
    console.print(f"search finished in {outcome.wall_s:.0f}s; Ray results: {outcome.storage}")
    console.print(f"MLflow: experiment {cfg.experiment_name!r}, parent run {outcome.target.parent_run_id}")
    console.print(f"  show again:  prunetune front {cfg.experiment_name}" +
                  ("" if cfg.tracking.uri is None else f" --tracking-uri {uri}"))
    if uri.startswith("sqlite:"):
        console.print(f"  browse:      mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    console.print(f"  Optuna:      optuna-dashboard {outcome.study_url} --host 127.0.0.1"
                  "  (pip install optuna-dashboard)")
    if not outcome.front:
        console.print("[red]no trial finished[/]; see the errors above")
        return 1
    return 0


def cmd_front(args, console: Console) -> int:
    from prunetune.search.front import FrontNotFound, load_front, print_front
    from prunetune.search.tracking import default_uri

    uri = args.tracking_uri or default_uri()
    try:
        doc, run_id = load_front(uri, args.experiment)
    except FrontNotFound as err:
        console.print(f"[red]error[/] {err} at {uri}", highlight=False)
        return EXIT_BAD_INPUT
    print_front(doc, console, title=f"{args.experiment}: Pareto front (run {run_id})")
    return 0


def _pick_argument_error(args) -> str | None:
    """The first unusable `pick` flag, as a message; None when all are usable."""
    for flag, value in (("--max-macs", args.max_macs), ("--max-latency-ms", args.max_latency_ms)):
        if value is not None and not value > 0:
            return f"{flag}: must be a positive number, got {value:g}"
    if args.min_accuracy is not None and not 0 <= args.min_accuracy <= 1:
        return f"--min-accuracy: must be a validation accuracy in [0, 1], got {args.min_accuracy:g}"
    if args.model_name is not None and not args.model_name.strip():
        return "--model-name: must not be empty"
    return None


def cmd_pick(args, console: Console) -> int:
    problem = _pick_argument_error(args)
    if problem:
        console.print(f"[red]error[/] {problem}", highlight=False)
        return EXIT_BAD_INPUT
    from prunetune.search.pick import run_pick

    return run_pick(args, console)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.command in ("prune", "verify"):
        from prunetune.search import prune_cmd

        handler = prune_cmd.cmd_prune if args.command == "prune" else prune_cmd.cmd_verify
        return prune_cmd.run(args, console, handler)
    if args.command in ("cluster", "launch", "jobs"):
        from prunetune.cluster.cli import run as run_cluster_command

        return run_cluster_command(args, console)
    handler = {"search": cmd_search, "front": cmd_front, "pick": cmd_pick}[args.command]
    from mlflow.exceptions import MlflowException

    try:
        return handler(args, console)
    except MlflowException as err:
        refused = err.error_code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or any(
            f"error code {c}" in str(err) for c in (401, 403))
        if not refused:
            raise
        console.print(f"[red]error[/] the MLflow server refused the request ({err.error_code}): set "
                      "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user it knows", highlight=False)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
