"""`prunetune pick`: one subnet from a search's Pareto front, rebuilt, re-tested, exported, registered.

The front in MLflow is a record of numbers; deploying needs the network itself. pick chooses
a front member under the user's constraints by validation accuracy only (the test split is
reported, never selected on), rebuilds it from its trial's spec + weights, re-evaluates it on
the test split (it must reproduce the accuracy the search logged), exports it as `prunetune
prune` does, and registers it in the MLflow Model Registry with tags that trace it back to its
experiment, search run, trial and parent.
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table
from torch import nn

from prunetune.search.config import ConfigError, ExperimentConfig, parse_config
from prunetune.search.front import FrontNotFound, load_front, policy_summary, vector_summary
from prunetune.search.prune_cmd import BadInput, cost_table, ensure_empty_out, export_table, write_subnet_folder
from prunetune.search.runner import cache_dir_for
from prunetune.search.tracking import default_uri
from prunetune.spaces import PruningError, SubnetSpec, example_from_spec, load_subnet, rebuild
from prunetune.trainers.data import DataSplits, load_splits
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.models import build_model

EXIT_BAD_INPUT = 2
RULE = "highest val_acc among the front members that meet every constraint; ties -> fewer MACs"
ACC_TOLERANCE = 1e-6
CLOSEST_SHOWN = 3


class NoFeasible(LookupError):
    """No front member meets the constraints; the message names what excluded the closest ones."""


@dataclass(frozen=True)
class Bound:
    """One constraint: the record's `metric` must stay <= (`kind` "max") or >= ("min") `limit`."""

    flag: str
    metric: str
    kind: str
    limit: float

    def excess(self, rec: dict) -> float:
        """Relative violation: 0 when met, inf when the record lacks the metric."""
        value = rec.get(self.metric)
        if value is None:
            return math.inf
        gap = float(value) - self.limit if self.kind == "max" else self.limit - float(value)
        return max(0.0, gap / self.limit) if self.limit else (math.inf if gap > 0 else 0.0)

    def violation(self, rec: dict) -> str:
        """e.g. `macs 3.1M > --max-macs 2M (+55%)`; empty when met."""
        excess = self.excess(rec)
        if excess == 0:
            return ""
        value = rec.get(self.metric)
        if value is None:
            return f"{self.metric} not recorded (needed by {self.flag})"
        op, sign = (">", "+") if self.kind == "max" else ("<", "-")
        rel = f" ({sign}{excess:.0%})" if math.isfinite(excess) else ""
        return f"{self.metric} {_show(self.metric, value)} {op} {self.flag} {_show(self.metric, self.limit)}{rel}"


def _show(metric: str, value) -> str:
    v = float(value)
    if metric == "macs":
        return f"{v / 1e6:.3g}M"
    if metric == "latency_ms":
        return f"{v:.3g} ms"
    return f"{v:.4g}"


def bounds_from_args(args) -> list[Bound]:
    """The constraints given on the command line (validated by the CLI: positive, accuracy in [0, 1])."""
    given = [("--max-macs", "macs", "max", args.max_macs),
             ("--max-latency-ms", "latency_ms", "max", args.max_latency_ms),
             ("--min-accuracy", "val_acc", "min", args.min_accuracy)]
    return [Bound(flag, metric, kind, float(limit)) for flag, metric, kind, limit in given if limit is not None]


def violations(rec: dict, bounds: Sequence[Bound]) -> list[str]:
    return [v for v in (b.violation(rec) for b in bounds) if v]


def best(front: Sequence[dict], bounds: Sequence[Bound]) -> dict | None:
    """The feasible member with the highest val_acc (ties -> fewer MACs); None when none is feasible."""
    feasible = [r for r in front if not violations(r, bounds)]
    if not feasible:
        return None
    return max(feasible, key=lambda r: (float(r["val_acc"]), -float(r.get("macs") or math.inf)))


def no_feasible_message(front: Sequence[dict], bounds: Sequence[Bound], where: str) -> str:
    """Which constraint excludes how many members, then the closest members and their violations."""
    n = len(front)
    counts = ", ".join(f"{b.flag} {_show(b.metric, b.limit)} excludes {sum(b.excess(r) > 0 for r in front)} of {n}"
                       for b in bounds)
    closest = sorted(front, key=lambda r: sum(b.excess(r) for b in bounds))[:CLOSEST_SHOWN]
    lines = [f"  {r.get('trial_id', '?')}: {'; '.join(violations(r, bounds))}" for r in closest]
    return (f"no member of the front of {where} meets the constraints ({counts}); "
            f"closest to meeting them:\n" + "\n".join(lines))


def status_table(front: Sequence[dict], bounds: Sequence[Bound], chosen: dict | None, *, title: str) -> Table:
    """The front with each member's constraint status; the chosen row is marked."""
    table = Table(title=title)
    for col in ("trial", "val_acc", "test_acc", "MMACs", "ms", "policy", "vector", "constraints"):
        table.add_column(col, justify="left" if col in ("trial", "policy", "vector", "constraints") else "right")

    def num(v, fmt: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(float(v) / scale, fmt)

    for r in front:
        table.add_row(str(r.get("trial_id", "-")), num(r.get("val_acc"), ".4f"), num(r.get("test_acc"), ".4f"),
                      num(r.get("macs"), ".3f", 1e6), num(r.get("latency_ms"), ".2f"), policy_summary(r),
                      vector_summary(r), _status(r, bounds, chosen), style="bold" if r is chosen else None)
    return table


def _status(rec: dict, bounds: Sequence[Bound], chosen: dict | None) -> str:
    if rec is chosen:
        return "[green]chosen[/]"
    failed = violations(rec, bounds)
    return f"[red]{'; '.join(failed)}[/]" if failed else "ok"


def _download(client: MlflowClient, run_id: str, path: str, dest: str) -> Path:
    try:
        return Path(client.download_artifacts(run_id, path, dest))
    except (MlflowException, OSError) as err:
        raise BadInput(f"run {run_id}: cannot download artifact {path!r}: {err}") from None


def search_config(client: MlflowClient, search_run_id: str, tmp: str) -> ExperimentConfig:
    """The experiment config the search ran with (its `config.yaml` artifact)."""
    path = _download(client, search_run_id, "config.yaml", tmp)
    return parse_config(yaml.safe_load(path.read_text()), source=f"config.yaml of search run {search_run_id}")


def rebuild_subnet(cfg: ExperimentConfig, spec: SubnetSpec, weights: dict, splits: DataSplits):
    """(parent skeleton, subnet with the trial's weights): the spec replayed on a fresh parent."""
    skeleton = build_model(cfg.model.name, in_channels=splits.in_channels, num_classes=splits.num_classes).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = rebuild(skeleton, spec)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise BadInput(f"subnet weights do not fit the rebuilt structure: {err}") from None
    return skeleton, model.eval()


def subnet_input(spec: SubnetSpec) -> torch.Tensor:
    """The parent's example input (zeros) at the subnet's resolution."""
    x = example_from_spec(spec)
    if x.dim() == 4 and spec.resolution != x.shape[-1]:
        x = torch.zeros(x.shape[0], x.shape[1], spec.resolution, spec.resolution, dtype=x.dtype)
    return x


def lineage_tags(experiment: str, search_run_id: str, rec: dict, spec: SubnetSpec, test_acc: float) -> dict:
    """Model-version tags that trace the subnet back to where it came from and what it scored."""
    tags = {"prunetune.experiment": experiment, "prunetune.search_run_id": search_run_id,
            "prunetune.trial_id": str(rec.get("trial_id")), "prunetune.trial_run_id": str(rec["mlflow_run_id"]),
            "prunetune.parent_id": spec.parent_id, "prunetune.parent_hash": spec.parent_hash,
            "prunetune.vector": spec.vector.model_dump_json(), "prunetune.val_acc": str(float(rec["val_acc"])),
            "prunetune.test_acc": str(test_acc), "prunetune.macs": str(int(float(rec["macs"])))}
    if rec.get("policy"):
        tags["prunetune.policy"] = str(rec["policy"])
    return tags


def register(client: MlflowClient, name: str, run_id: str, tags: dict, description: str):
    """A new version of registered model `name` (created if missing) from the trial's `subnet` artifact."""
    try:
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="prunetune subnets picked from Pareto fronts")
    return client.create_model_version(name, source=f"runs:/{run_id}/subnet", run_id=run_id, tags=tags,
                                       description=description)


def pick(args, console: Console) -> int:
    """Choose from the latest front (printing why), then deploy the choice."""
    out = Path(args.out)
    ensure_empty_out(out)
    uri = args.tracking_uri or default_uri()
    bounds = bounds_from_args(args)
    try:
        doc, search_run_id = load_front(uri, args.experiment)
    except FrontNotFound as err:
        raise FrontNotFound(f"{err} at {uri}") from None
    front = doc.get("front", [])
    where = f"experiment {args.experiment!r} (search run {search_run_id})"
    if not front:
        raise FrontNotFound(f"the front of {where} is empty: no trial finished")
    chosen = best(front, bounds)
    given = ", ".join(f"{b.flag} {_show(b.metric, b.limit)}" for b in bounds) or "none"
    console.print(status_table(front, bounds, chosen, title=f"{args.experiment}: Pareto front (run {search_run_id}), "
                                                            f"constraints: {given}"))
    if chosen is None:
        raise NoFeasible(no_feasible_message(front, bounds, where))
    n_ok = sum(not violations(r, bounds) for r in front)
    console.print(f"chose trial {chosen['trial_id']}: val_acc {float(chosen['val_acc']):.4f}, "
                  f"{float(chosen['macs']) / 1e6:.3f}M MACs; rule: {RULE} ({n_ok} of {len(front)} meet "
                  f"constraints: {given}). Test accuracy is reported, never selected on.", highlight=False)
    return deploy(args, console, uri=uri, search_run_id=search_run_id, chosen=chosen, bounds=bounds, out=out)


def retest(model: nn.Module, splits: DataSplits, spec: SubnetSpec, chosen: dict, console: Console) -> float:
    """Test accuracy of the rebuilt subnet, printed next to the one the search logged."""
    console.print(f"evaluating it on the test split ({len(splits.test)} samples, resolution {spec.resolution}) ...")
    acc, _ = evaluate(model, splits.test, device=torch.device("cpu"), resolution=spec.resolution)
    logged = chosen.get("test_acc")
    console.print(f"test_acc: re-evaluated {acc:.6f}, logged by the search "
                  + ("-" if logged is None else f"{float(logged):.6f}"), highlight=False)
    if logged is not None and abs(acc - float(logged)) > ACC_TOLERANCE:
        console.print(f"[bold yellow]warning[/] the rebuilt subnet's test accuracy differs from the logged one by "
                      f"{acc - float(logged):+.6f}: the data, the stored weights or the code changed since the search",
                      highlight=False)
    return acc


def deploy(args, console: Console, *, uri: str, search_run_id: str, chosen: dict, bounds: Sequence[Bound],
           out: Path) -> int:
    """Rebuild, re-test, export and register the chosen front member."""
    client = MlflowClient(uri)
    run_id = chosen["mlflow_run_id"]
    console.print(f"downloading the subnet of trial {chosen['trial_id']} (run {run_id}) and the search config ...")
    with tempfile.TemporaryDirectory() as tmp:
        spec, weights = load_subnet(_download(client, run_id, "subnet", tmp))
        cfg = search_config(client, search_run_id, tmp)
    console.print(f"rebuilding it on a fresh {cfg.model.name} ({cfg.data.name} data) ...", highlight=False)
    splits = load_splits(cfg.data, seed=cfg.seed, cache_dir=cache_dir_for(cfg))
    skeleton, model = rebuild_subnet(cfg, spec, weights, splits)
    spec = spec.model_copy(update={"parent_args": {"in_channels": splits.in_channels,
                                                   "num_classes": splits.num_classes}})
    test_acc = retest(model, splits, spec, chosen, console)
    record = {"experiment": args.experiment, "tracking_uri": uri, "search_run_id": search_run_id,
              "trial_id": chosen.get("trial_id"), "trial_run_id": run_id,
              "constraints": {b.flag.removeprefix("--").replace("-", "_"): b.limit for b in bounds},
              "rule": RULE, "chosen": chosen, "test_acc_logged": chosen.get("test_acc"),
              "test_acc_reevaluated": test_acc}
    if not export(out, spec, model, skeleton, cfg, record, console):
        return 1
    name = args.model_name or f"{args.experiment}-subnet"
    console.print(f"registering in the MLflow Model Registry as {name!r} ...", highlight=False)
    version = register(client, name, run_id, lineage_tags(args.experiment, search_run_id, chosen, spec, test_acc),
                       description=f"trial {chosen.get('trial_id')} of search run {search_run_id}; {RULE}")
    record["registered_model"] = {"name": name, "version": int(version.version)}
    (out / "pick.json").write_text(json.dumps(record, indent=2))
    console.print(f"registered model {name!r} version {version.version} (source runs:/{run_id}/subnet)",
                  highlight=False)
    console.print(f"wrote {out}/: subnet.json, weights.safetensors, model.ts, model.onnx, cost.json, pick.json",
                  highlight=False)
    return 0


def export(out: Path, spec: SubnetSpec, model: nn.Module, skeleton: nn.Module, cfg: ExperimentConfig,
           record: dict, console: Console) -> bool:
    """`prunetune prune`'s folder (spec, weights, TorchScript, ONNX, cost.json) plus pick.json; True when
    both exports pass their parity check. Cost is timed with the search's cost settings."""
    console.print(f"exporting to {out} ...", highlight=False)
    records, before, after = write_subnet_folder(
        out, spec, model, skeleton, example_from_spec(spec), subnet_input(spec), batch=cfg.cost.batch,
        repeats=cfg.cost.repeats, console=console, extra_files={"pick.json": json.dumps(record, indent=2)})
    console.print(cost_table(before, after))
    console.print(export_table(records))
    if all(r.ok for r in records.values()):
        return True
    console.print(f"[red]an export failed its parity check[/]; {out} kept for inspection, nothing registered",
                  highlight=False)
    return False


def run_pick(args, console: Console) -> int:
    """CLI entry: bad input (unknown experiment, nothing feasible, unusable record) -> message, exit 2."""
    try:
        return pick(args, console)
    except (BadInput, FrontNotFound, NoFeasible, ConfigError, PruningError) as err:
        console.print(f"[red]error[/] {err}", highlight=False)
        return EXIT_BAD_INPUT
