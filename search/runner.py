"""One search, driver side: parent -> MLflow parent run -> Ray Tune + Optuna -> Pareto front.

Config validation has already happened (`search.config.load_config`); nothing here runs
for a bad config.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console

from prunetune.search.config import ExperimentConfig
from prunetune.search.early_selection import make_scheduler
from prunetune.search.live_front import LiveFront
from prunetune.search.numerical_gradient import NumericalGradient, coordinates, make_searcher, projector
from prunetune.search.pareto import Objective
from prunetune.search.policy_space import SearchSpace
from prunetune.search.progress import SearchProgress
from prunetune.search.resume import CONFIG_HASH_TAG, NothingToResume, config_hash, find_search, reopen
from prunetune.search.samplers import grid_size, grid_space, make_sampler
from prunetune.search.tracking import (TrackingTarget, default_uri, log_metrics, optuna_storage_url, retry,
                                      start_search_run)
from prunetune.search.trainable import SearchContext, run_trial
from prunetune.spaces import describe, measure_full_cost, optuna_distributions
from prunetune.spaces.cost_cache import CostCache
from prunetune.trainers.data import load_splits
from prunetune.trainers.parent import get_parent



@dataclass
class SearchOutcome:
    target: TrackingTarget
    records: list[dict]
    front: list[dict]
    hypervolume: float | None
    front_doc: dict
    wall_s: float
    storage: str       # the Tune experiment's folder or URI
    study_url: str     # the Optuna study's storage


def cache_dir_for(cfg: ExperimentConfig) -> Path:
    if cfg.cache_dir is not None:
        return cfg.cache_dir.expanduser().resolve()
    env = os.environ.get("PRUNETUNE_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "prunetune"


def _objectives(cfg: ExperimentConfig) -> list[Objective]:
    return [Objective(o.metric, o.mode) for o in cfg.objectives]


def _quiet_libraries() -> None:
    import logging

    # Keeping one checkpoint per trial makes Tune snapshot its state at every epoch report and
    # then warn, at every report, that it snapshots often; the snapshots are small here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_search(cfg: ExperimentConfig, *, console: Console | None = None, resume: bool = False,
               callbacks: Sequence[object] = ()) -> SearchOutcome:
    """Run the search of `cfg`; with `resume`, continue its unfinished search instead (see
    `search.resume`; raises `NothingToResume` before any work when there is none). `callbacks`
    are extra Ray Tune callbacks (`ray.tune.Callback`), run after prunetune's own."""
    console = console or Console()
    _quiet_libraries()
    t0 = time.monotonic()
    cache = cache_dir_for(cfg)
    uri = cfg.tracking.uri or default_uri()
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    if resume and cfg.sampler.name == "gradient":
        raise NothingToResume("--resume needs an Optuna sampler (its study holds the search state); "
                              "the gradient searcher keeps its state in memory")
    resumed_target = find_search(client, cfg, uri) if resume else None
    console.print(f"[bold]prunetune search[/] {cfg.name}: {cfg.model.name} on {cfg.data.name}, "
                  f"{cfg.budget.trials} trials, {cfg.budget.concurrency} at a time, sampler {cfg.sampler.name}")

    splits = load_splits(cfg.data, seed=cfg.seed, cache_dir=cache)
    console.print(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
                  f"{splits.in_channels}x{splits.image_size}x{splits.image_size}, {splits.num_classes} classes")

    def parent_epoch(s):
        console.print(f"  parent epoch {s.epoch}/{cfg.parent.recipe.epochs}: val_acc {s.val_acc:.3f} "
                      f"loss {s.train_loss:.3f} ({s.seconds:.1f}s)", highlight=False)

    console.print("parent: " + ("loading checkpoint" if cfg.parent.checkpoint else "training or loading from cache"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    parent, info = get_parent(cfg.model.name, cfg.data, splits, cfg.parent.recipe, seed=cfg.seed,
                              cache_dir=cache, checkpoint=cfg.parent.checkpoint, on_epoch=parent_epoch)
    c = cfg.cost
    pcost = measure_full_cost(parent, torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size),
                              batch=c.batch, latency=c.latency, threads=c.threads, repeats=c.repeats,
                              warmup=3, cache=CostCache(cache / "costs"))
    parent_rec = {"val_acc": info.val_acc, "test_acc": info.test_acc, "macs": pcost.macs, "params": pcost.params,
                  "peak_activation_bytes": pcost.peak_activation_bytes}
    if pcost.latency_ms is not None:
        parent_rec["latency_ms"] = pcost.latency_ms
    console.print(f"parent {info.parent_id} ({info.source}): val_acc {info.val_acc:.3f}, test_acc "
                  f"{info.test_acc:.3f}, {pcost.macs / 1e6:.2f}M MACs, {pcost.params / 1e6:.3f}M params"
                  + (f", {pcost.latency_ms:.2f} ms" if pcost.latency_ms is not None else ""))

    import optuna

    study_url = optuna_storage_url(uri, cfg.sampler.storage, folder=cache)
    done: list[dict] = []
    if resumed_target is not None:
        target = resumed_target
        study = optuna.load_study(study_name=_study_name(cfg, target), storage=study_url)
        resumed = reopen(client, target, study)
        done = resumed.records
        console.print(f"resuming search run {target.parent_run_id}: {len(done)} trials done, "
                      f"{len(resumed.interrupted)} interrupted ({', '.join(resumed.interrupted) or 'none'})")
    else:
        target = start_search_run(uri, cfg.experiment_name, run_name=f"{cfg.name}-search", params={
            "model": cfg.model.name, "data": cfg.data.name, "trials": cfg.budget.trials,
            "concurrency": cfg.budget.concurrency, "sampler": cfg.sampler.name, "seed": cfg.seed,
            "parent_id": info.parent_id, "optuna_storage": study_url,
            "objectives": ",".join(f"{o.metric}:{o.mode}" for o in cfg.objectives)},
            tags={"prunetune.config_name": cfg.name, CONFIG_HASH_TAG: config_hash(cfg)})
        log_metrics(client, target.parent_run_id, {f"parent_{k}": v for k, v in parent_rec.items()}, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            retry(lambda: client.log_artifacts(target.parent_run_id, tmp))

    from prunetune.cluster.connect import connect
    connect(cfg.ray.address)
    from ray import tune

    from prunetune.search.optuna_search import PrunetuneOptunaSearch

    objectives = _objectives(cfg)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    structure = describe(parent, example)  # once; every trial gets it through the context
    space = SearchSpace(optuna_distributions(structure, cfg.space), cfg.policy)
    grid = grid_space(space.single_policy_distributions()) if cfg.sampler.name == "grid" else None
    trials = min(cfg.budget.trials, grid_size(grid)) if grid is not None else cfg.budget.trials
    if trials < cfg.budget.trials:
        console.print(f"grid of {trials} points: {trials} trials instead of {cfg.budget.trials}")
    if cfg.sampler.name == "gradient":
        searcher = _gradient_searcher(cfg, space, parent, example, structure, pcost.macs)
    else:
        searcher = PrunetuneOptunaSearch(space, metric=[o.metric for o in objectives],
                                         mode=[o.mode for o in objectives], sampler=make_sampler(cfg, grid),
                                         storage=optuna.storages.RDBStorage(study_url),
                                         study_name=_study_name(cfg, target))
    ctx = SearchContext(config_json=cfg.model_dump_json(), parent_state=parent.state_dict(),
                        parent_id=info.parent_id, cache_dir=str(cache), target=target, structure=structure)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _trial_resources(cfg))
    progress = SearchProgress(objectives, trials, console)
    progress.records.update({r["trial_id"]: r for r in done})
    trials = max(0, trials - len(done))
    cost_metric = next(o.metric for o in objectives if o.mode == "min")
    scheduler = make_scheduler(cfg.early_stop, cost_metric) if cfg.early_stop.enabled else None
    live = LiveFront(progress, objectives, target, parent=parent_rec, title=f"{cfg.name}: Pareto front",
                     stop_reasons=scheduler.selection.reasons if scheduler else None)
    storage = cfg.ray.storage_uri()
    run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"policy: {', '.join(cfg.policy.names)}; search space: {', '.join(space.keys())}")
    if trials:
        tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=trials, scheduler=scheduler,
                                        max_concurrent_trials=cfg.budget.concurrency,
                                        reuse_actors=cfg.ray.reuse_actors,
                                        time_budget_s=cfg.budget.time_budget_s),
            run_config=tune.RunConfig(name=run_name, storage_path=storage, verbose=0,
                                      callbacks=[progress, live, *callbacks], log_to_file=True,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        ).fit()

    records = list(progress.records.values())
    outcome = _finish(cfg, client, target, records, live, f"{storage.rstrip('/')}/{run_name}", t0, study_url)
    return outcome


def _gradient_searcher(cfg, space, parent, example, structure, parent_macs):
    """The numerical-gradient searcher, its MACs oracle built on the engine (pruning is cheap)."""
    from prunetune.spaces import PruningVector, measure_cost, prune

    g = cfg.sampler.gradient
    coords = coordinates(space.vector)
    cache: dict[tuple, float] = {}

    def macs_of(flat: dict) -> float:
        key = tuple(sorted(flat.items()))
        if key not in cache:
            vector = PruningVector.from_flat(flat)
            sub = prune(parent, vector, example, structure=structure, round_to=cfg.space.round_to)
            res = vector.resolution or example.shape[-1]
            cache[key] = measure_cost(sub.module, in_channels=example.shape[1], resolution=res).macs
        return cache[key]

    project = projector(coords, macs_of, g.target_macs_ratio * parent_macs) if g.objective == "constraint" else None
    opt = NumericalGradient(coords, g, project=project or (lambda x: x), seed=cfg.seed)
    return make_searcher(opt, g, parent_macs, fixed={"policy": cfg.policy.names[0]})


def _trial_resources(cfg: ExperimentConfig):
    """A trial's Ray resources: a CPU/GPU request, or with DeepSpeed a placement group (bundle 0
    the trial, one bundle per worker; see `trainers.distributed.trial_resources`)."""
    r = cfg.resources
    if r.data_parallel is None:
        return {"cpu": r.cpu, "gpu": r.gpu}
    from prunetune.trainers.distributed import trial_resources

    return trial_resources(r.workers, r.cpu, r.gpu, driver_cpus=r.trial_cpu)


def _study_name(cfg: ExperimentConfig, target: TrackingTarget) -> str:
    return f"{cfg.experiment_name}/{target.parent_run_id}"


def _finish(cfg, client, target, records, live: LiveFront, storage, t0, study_url) -> SearchOutcome:
    finished = [r for r in records if r.get("status") == "finished"]
    doc = live.update()  # final front artifacts, hypervolume and rank tags
    if not doc:
        raise RuntimeError("could not write the final Pareto front to MLflow (see the message above)")
    for r in finished:
        if r["trial_id"] in live.ranks:
            r["pareto_rank"] = live.ranks[r["trial_id"]]
    hv = doc.get("hypervolume")
    walls = [r for r in finished if r.get("wall_s") and r.get("compute_s") is not None]
    summary = {"trials_finished": len(finished), "trials_failed": sum(r.get("status") == "error" for r in records),
               "search_wall_s": time.monotonic() - t0}
    if walls:
        summary["overhead_fraction"] = sum(1 - r["compute_s"] / r["wall_s"] for r in walls) / len(walls)
        summary["trial_wall_s_mean"] = sum(r["wall_s"] for r in walls) / len(walls)
    log_metrics(client, target.parent_run_id, summary, step=0)
    status = "FINISHED" if finished else "FAILED"
    retry(lambda: client.set_terminated(target.parent_run_id, status))
    return SearchOutcome(target, records, doc.get("front", []), hv, doc, time.monotonic() - t0, storage, study_url)
