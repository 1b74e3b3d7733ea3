"""The Ray Tune function trainable: one candidate -> Tune reports + an MLflow child run.

The torch work lives in `trainers.trial.run_candidate`; this module only wires its events
to `tune.report` (so schedulers can act after every step) and to MLflow (params = the full
vector and recipe, metrics per epoch, the subnet as spec + safetensors weights).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from ray import tune

from prunetune.search.config import ExperimentConfig
from prunetune.search.policy_space import POLICY_KEY, resolve
from prunetune.search.constraints import VIOLATION_KEY
from prunetune.search.tracking import REASON_TAG, STATUS_TAG, ChildRun, TrackingTarget
from prunetune.search.trial_checkpoint import (SUBNET_DIR, TrialProgress, read_checkpoint, write_checkpoint,
                                               write_progress)
from prunetune.spaces import ModelStructure, Pruned, PruningVector, rebuild, save_subnet
from prunetune.trainers.data import load_splits, probe_indices
from prunetune.trainers.models import build_model
from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.policies import Policy
from prunetune.trainers.trial import (CandidateSetup, Epoch, Finished, Iteration, Materialized, finetune_and_test,
                                     run_candidate)


@dataclass(frozen=True)
class SearchContext:
    """Everything a trial needs besides its sampled vector; shipped through Ray's object store."""

    config_json: str
    parent_state: dict
    parent_id: str
    cache_dir: str
    target: TrackingTarget
    structure: ModelStructure  # describe() of the parent, computed once by the driver


def _device(cfg: ExperimentConfig) -> torch.device:
    return torch.device("cuda") if cfg.resources.gpu > 0 and torch.cuda.is_available() else torch.device("cpu")


def build_setup(cfg: ExperimentConfig, ctx: SearchContext, vector: PruningVector,
                policy: Policy | None = None, distill: DistillConfig | None = None) -> CandidateSetup:
    splits = load_splits(cfg.data, seed=cfg.seed, cache_dir=Path(ctx.cache_dir))
    parent = build_model(cfg.model.name, in_channels=splits.in_channels, num_classes=splits.num_classes)
    parent.load_state_dict(ctx.parent_state)
    parent.eval()
    idx = probe_indices(len(splits.val), cfg.probes.size, cfg.seed)
    probes = torch.stack([splits.val[int(i)][0] for i in idx])
    return CandidateSetup(parent=parent, parent_id=ctx.parent_id, splits=splits, probes=probes,
                          vector=vector, recipe=cfg.finetune, importance=cfg.space.importance,
                          round_to=cfg.space.round_to, block_criterion=cfg.space.block_criterion,
                          model_name=cfg.model.name, seed=cfg.seed, device=_device(cfg),
                          cost=cfg.cost, cost_cache=Path(ctx.cache_dir) / "costs",
                          distill=distill or cfg.distill, structure=ctx.structure, policy=policy,
                          data_parallel=cfg.resources.data_parallel)


def trial_params(cfg: ExperimentConfig, vector: PruningVector, policy: Policy, distill: DistillConfig) -> dict:
    recipe = {f"finetune.{k}": v for k, v in cfg.finetune.model_dump().items()}
    kd = {f"distill.{k}": v for k, v in distill.model_dump().items()}
    hyper = {f"{policy.name}.{k}": v for k, v in policy.get_params().items()}
    return {**vector.to_flat(), **recipe, **kd, POLICY_KEY: policy.name, **hyper, "importance": cfg.space.importance,
            "round_to": cfg.space.round_to, "block_criterion": cfg.space.block_criterion,
            "seed": cfg.seed, "model": cfg.model.name}


def _cost_metrics(event: Materialized) -> dict:
    c = event.cost
    extra = {k: v for k, v in (("latency_ms", c.latency_ms), ("latency_ms_batch", c.latency_ms_batch),
                               ("peak_activation_bytes", c.peak_activation_bytes)) if v is not None}
    return {"macs": c.macs, "params": c.params, "cka": event.cka["mean"], **extra,
            **{f"cka.{k}": v for k, v in event.cka.items() if k != "mean"}}


def _pruned_metrics(base: dict, event: Materialized) -> dict:
    """The epoch-0 report: the pruned subnet before its final fine-tune."""
    return {**base, "epoch": 0, "val_acc": event.val_acc, "val_loss": event.val_loss, "materialize_s": event.seconds}


def _stop_infeasible(run: ChildRun, metrics: dict, violations: dict[str, float]) -> None:
    """End a trial that breaks a hard constraint before it is trained (see search.constraints)."""
    reason = "; ".join(f"{k} exceeded by {v:.0%}" for k, v in violations.items())
    final = {**metrics, VIOLATION_KEY: sum(violations.values()), "infeasible": 1}
    run.metrics({k: v for k, v in final.items() if k not in ("mlflow_run_id", "epoch")}, step=0)
    run.tags({STATUS_TAG: "infeasible", REASON_TAG: reason})
    run.end("FINISHED")
    tune.report(final)


def _restore(setup: CandidateSetup) -> tuple[TrialProgress, Pruned, dict | None] | None:
    """The trial's latest Tune checkpoint (after a node loss Tune restarts the trial with it), rebuilt."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        progress, spec, weights, state = read_checkpoint(Path(d))
    module = rebuild(copy.deepcopy(setup.parent), spec)
    module.load_state_dict(weights, strict=True)
    return progress, Pruned(module, spec), state


def run_trial(config: dict, ctx: SearchContext) -> None:
    """Ray Tune entry point (wrapped with `tune.with_parameters(run_trial, ctx=...)`).

    Every fine-tune epoch is reported with a checkpoint (`search.trial_checkpoint`); a trial
    restarted from one continues its fine-tune and its MLflow run instead of starting over.
    """
    t_start = time.perf_counter()
    cfg = ExperimentConfig.model_validate_json(ctx.config_json, context={"trusted": True})
    r = cfg.resources
    torch.set_num_threads(max(1, int(r.trial_cpu if r.data_parallel is not None else r.cpu)))
    policy, distill = resolve(config, cfg.policy, cfg.distill)
    vector = PruningVector.from_flat(config)
    if (policy.uses_vector and vector.resolution is None and cfg.space.resolutions
            and len(cfg.space.resolutions) == 1):
        vector = vector.model_copy(update={"resolution": cfg.space.resolutions[0]})
    trial_id = tune.get_context().get_trial_id()
    setup = build_setup(cfg, ctx, vector, policy, distill)
    restored = _restore(setup)
    t_mlflow = time.perf_counter()
    if restored is None:
        run = ChildRun.open(ctx.target, trial_id=trial_id, run_name=f"trial-{trial_id}")
        run.params(trial_params(cfg, vector, policy, distill))
    else:
        run = ChildRun.reopen(ctx.target, restored[0].mlflow_run_id)
    mlflow_s = time.perf_counter() - t_mlflow
    setup_s = time.perf_counter() - t_start - mlflow_s
    base: dict = {"mlflow_run_id": run.run_id}
    compute_s = 0.0
    in_report = False
    iterations: list[dict] = []   # the policy's rounds, also kept as policy/iterations.json
    try:
        if restored is not None:
            progress, subnet, state = restored
            base.update(progress.base)
            compute_s, mlflow_s = progress.compute_s, progress.mlflow_s + mlflow_s
            if progress.final is not None:   # it had finished; only Tune missed the news
                run.end("FINISHED")
                in_report = True
                tune.report(progress.final)
                return
            events = finetune_and_test(setup, subnet, resume=state)
            metrics = dict(progress.last)
        else:
            # Policies that know their subnet before training prune it now, so a candidate that
            # breaks a hard constraint is never trained; the others are checked at Materialized.
            preview = policy.preview(setup) if cfg.constraints.active else None
            if preview is not None:
                base.update(_cost_metrics(preview))
                violations = cfg.constraints.violations(preview.cost)
                if violations:
                    in_report = True
                    _stop_infeasible(run, _pruned_metrics(base, preview), violations)
                    return
            events = run_candidate(setup)
        for event in events:
            if isinstance(event, Iteration):
                compute_s += event.seconds
                t0 = time.perf_counter()
                run.metrics({f"{policy.name}.{k}": v for k, v in event.metrics.items()}, step=event.step)
                iterations.append({"step": event.step, **event.metrics, **event.info})
                mlflow_s += time.perf_counter() - t0
                continue
            if isinstance(event, Materialized):
                base.update(_cost_metrics(event))
                metrics = _pruned_metrics(base, event)
                violations = cfg.constraints.violations(event.cost)
                if violations:
                    in_report = True
                    _stop_infeasible(run, metrics, violations)
                    return
            elif isinstance(event, Epoch):
                s = event.stats
                compute_s += s.seconds
                metrics = {**base, "epoch": s.epoch, "val_acc": s.val_acc, "val_loss": s.val_loss,
                           "train_loss": s.train_loss}
            else:
                compute_s += event.seconds
                metrics = {**base, "epoch": metrics["epoch"], "val_acc": metrics["val_acc"],
                           "val_loss": metrics["val_loss"], "test_acc": event.test_acc, "test_loss": event.test_loss}
            t0 = time.perf_counter()
            logged = ({"test_acc": event.test_acc, "test_loss": event.test_loss} if isinstance(event, Finished)
                      else {k: v for k, v in metrics.items() if k not in ("mlflow_run_id", "epoch")})
            run.metrics(logged, step=metrics["epoch"])
            if not isinstance(event, Finished):
                mlflow_s += time.perf_counter() - t0
                in_report = True
                if isinstance(event, Epoch) and event.state is not None and event.subnet is not None:
                    with tempfile.TemporaryDirectory() as tmp:
                        progress = TrialProgress(run.run_id, event.stats.epoch, _base_only(base), compute_s, mlflow_s,
                                                 last=metrics)
                        write_checkpoint(Path(tmp), progress, event.subnet.spec, event.subnet.module,
                                         event.state())
                        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
                else:
                    tune.report(metrics)
                in_report = False
                continue
            with tempfile.TemporaryDirectory() as tmp:
                # The subnet is written once: the MLflow artifact and the final checkpoint's subnet/.
                ckpt_dir = Path(tmp)
                save_subnet(ckpt_dir / SUBNET_DIR, event.subnet.spec, event.subnet.module)
                run.artifacts(ckpt_dir / SUBNET_DIR, "subnet")
                if iterations:
                    with tempfile.TemporaryDirectory() as log_dir:
                        (Path(log_dir) / "iterations.json").write_text(json.dumps(iterations, indent=1))
                        run.artifacts(Path(log_dir), "policy")
                mlflow_s += time.perf_counter() - t0
                total = time.perf_counter() - t_start
                timing = {"trial_s": total, "compute_s": compute_s, "mlflow_s": mlflow_s,
                          "setup_s": setup_s, "overhead_s": total - compute_s}
                run.metrics(timing, step=metrics["epoch"])
                run.end("FINISHED")
                # "trial_complete" (not Tune's reserved "done") marks the result that carries test_acc.
                final = {**metrics, **timing, "trial_complete": 1}
                write_progress(ckpt_dir, TrialProgress(run.run_id, metrics["epoch"], _base_only(base), compute_s,
                                                       mlflow_s, final=final))
                in_report = True
                tune.report(final, checkpoint=tune.Checkpoint.from_directory(ckpt_dir))
                in_report = False
    except BaseException:
        # An exception out of tune.report means Tune stopped this trial; anything else is a failure.
        run.end("KILLED" if in_report else "FAILED")
        raise


def _base_only(base: dict) -> dict:
    return {k: v for k, v in base.items() if k != "mlflow_run_id"}
