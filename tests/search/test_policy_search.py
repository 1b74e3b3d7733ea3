"""A real search over several policies with searched hyperparameters and distillation: Ray
on loopback, MLflow sqlite, real training on digits (bundled with scikit-learn)."""

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from prunetune.search.config import parse_config
from prunetune.search.runner import run_search
from prunetune.search.tracking import ROLE_TAG
from prunetune.spaces import load_subnet, rebuild
from prunetune.trainers.data import load_splits
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.models import build_model
from prunetune.trainers.policies import POLICIES

TRIALS = 6


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory, cache_dir):
    work = tmp_path_factory.mktemp("policy-search")
    cfg = parse_config({
        "name": "policies", "seed": 1,
        "model": {"name": "cifar:resnet20"},
        "data": {"name": "digits", "image_size": 12, "val_fraction": 0.15, "limit_train": 800},
        "parent": {"recipe": {"epochs": 3, "lr": 0.05, "batch_size": 64}},
        "policy": {"name": ["sap", "allatonce", "depgraph-sl"],
                   "params": {"sap": {"iterations": 2, "eta_r": 0.3}, "allatonce": {"min_blocks": 1}},
                   "search": {"sap.gamma": None, "allatonce.target_macs_ratio": {"low": 0.5, "high": 0.8},
                              "distill.weight": None}},
        "sampler": {"name": "random"},
        "budget": {"trials": TRIALS, "concurrency": 2},
        "finetune": {"epochs": 1, "lr": 0.02, "batch_size": 64},
        "probes": {"size": 32},
        "cost": {"latency": False},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
        "ray": {"storage_path": str(work / "ray_results")},
        "cache_dir": str(cache_dir),
    })
    outcome = run_search(cfg)
    return cfg, outcome, MlflowClient(cfg.tracking.uri)


def _children(client, name):
    exp = client.get_experiment_by_name(name)
    return [r for r in client.search_runs([exp.experiment_id], max_results=100) if r.data.tags.get(ROLE_TAG) == "trial"]


def test_every_trial_records_its_policy_and_rounds(search, tmp_path):
    cfg, outcome, client = search
    children = _children(client, "policies")
    assert len(children) == TRIALS and all(c.info.status == "FINISHED" for c in children)
    drawn = {c.data.params["policy"] for c in children}
    assert len(drawn) >= 2, drawn
    for c in children:
        name = c.data.params["policy"]
        searched = {"sap": "sap.gamma", "allatonce": "allatonce.target_macs_ratio"}.get(name)
        assert searched is None or searched in c.data.params
        assert 0.0 <= float(c.data.params["distill.weight"]) <= 0.9
        assert any(k.startswith("ch.") for k in c.data.params) == POLICIES[name].uses_vector
        history = client.get_metric_history(c.info.run_id, f"{name}.val_acc")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1)) and steps
        local = Path(client.download_artifacts(c.info.run_id, "policy/iterations.json", str(tmp_path / c.info.run_id)))
        rounds = json.loads(local.read_text())
        assert [r["step"] for r in rounds] == steps
        if name == "allatonce":
            assert all(r["choice"] in ("layer", "filter") for r in rounds)
            assert 0.5 <= float(c.data.params["allatonce.target_macs_ratio"]) <= 0.8
        if name == "sap":
            assert all(0.0 <= r["pqi"] <= 1.0 and 0.0 < r["remaining"] <= 1.0 for r in rounds)


def test_front_subnet_of_an_iterative_policy_rebuilds(search, cache_dir, tmp_path):
    cfg, outcome, client = search
    for rec in outcome.front:
        local = Path(client.download_artifacts(rec["mlflow_run_id"], "subnet", str(tmp_path / rec["trial_id"])))
        spec, weights = load_subnet(local)
        assert spec.importance == rec["policy"] or spec.importance.startswith(rec["policy"])
        splits = load_splits(cfg.data, seed=cfg.seed, cache_dir=cache_dir)
        model = rebuild(build_model(cfg.model.name, in_channels=splits.in_channels, num_classes=splits.num_classes),
                        spec)
        model.load_state_dict(weights, strict=True)
        acc, _ = evaluate(model, splits.test, device=torch.device("cpu"), resolution=spec.resolution)
        assert acc == pytest.approx(rec["test_acc"], abs=1e-9)


def test_hard_constraint_stops_infeasible_candidates_before_training(ray_local, tmp_path, digits_search):
    """Half of the parent's MACs as a hard bound: candidates above it are never fine-tuned, are
    told to Optuna with their violation, carry the reason in MLflow and stay off the front."""
    from prunetune.spaces import measure_cost
    parent_macs = measure_cost(build_model("cifar:resnet8", in_channels=1, num_classes=10), in_channels=1,
                               resolution=12).macs
    raw = digits_search(tmp_path, "constrained", seed=2, sampler={"name": "random"},
                        space={"channel_ratio": {"low": 0.25, "high": 1.0, "step": 0.25}},
                        constraints={"max_macs": 0.5 * parent_macs}, budget={"trials": 6, "concurrency": 2})
    outcome = run_search(parse_config(raw))
    client = MlflowClient(raw["tracking"]["uri"])
    children = _children(client, "constrained")
    infeasible = [c for c in children if c.data.tags.get("prunetune.status") == "infeasible"]
    feasible = [c for c in children if c not in infeasible]
    assert infeasible and feasible, "the bound should split this space"
    for c in infeasible:
        assert c.data.metrics["macs"] > 0.5 * parent_macs
        assert c.data.metrics["constraint_violation"] > 0
        assert "max_macs exceeded" in c.data.tags["prunetune.stop_reason"]
        assert not client.get_metric_history(c.info.run_id, "train_loss"), "never trained"
    assert all(c.data.metrics["macs"] <= 0.5 * parent_macs for c in feasible)
    assert all(r["macs"] <= 0.5 * parent_macs for r in outcome.front)
    assert sum(r.get("status") == "infeasible" for r in outcome.records) == len(infeasible)
