"""CKA early selection: the decision rules on plain numbers, then a real search where weak
candidates are stopped before fine-tuning, told to Optuna as pruned and recorded in MLflow."""

import optuna
import pytest
from mlflow.tracking import MlflowClient

from prunetune.search.config import parse_config
from prunetune.search.early_selection import CONTINUE, STOP, EarlySelection, EarlySelectionConfig, _quantile
from prunetune.search.runner import run_search
from prunetune.search.tracking import REASON_TAG, ROLE_TAG, STATUS_TAG


def test_warmup_then_dominance():
    sel = EarlySelection(EarlySelectionConfig(warmup=2, dominated_by=2, bucket_quantile=None, rungs=[]))
    assert sel.on_pruned("a", 0.9, 10) == CONTINUE
    assert sel.on_pruned("b", 0.8, 5) == CONTINUE
    assert sel.on_pruned("c", 0.85, 12) == CONTINUE, "dominated by one (a) only"
    assert sel.on_pruned("d", 0.6, 20) == STOP, "a and b both have more CKA at lower cost"
    assert "dominated in (CKA, cost) by 3" in sel.reasons["d"]
    assert sel.on_pruned("e", 0.95, 50) == CONTINUE, "best CKA is never dominated"


def test_bucket_quantile_compares_like_cost_only():
    sel = EarlySelection(EarlySelectionConfig(warmup=3, dominated_by=None, bucket_quantile=0.5, buckets=2, rungs=[]))
    for i, (cka, cost) in enumerate([(0.9, 1), (0.8, 1.1), (0.85, 1.2), (0.3, 9), (0.35, 9.5), (0.4, 10)]):
        sel.on_pruned(f"t{i}", cka, cost)
    assert sel.on_pruned("cheap-weak", 0.5, 1.05) == STOP, "weak among the cheap candidates"
    assert sel.on_pruned("dear-ok", 0.5, 9.8) == CONTINUE, "0.5 is good among the expensive ones"


def test_successive_halving_on_accuracy_and_cost():
    sel = EarlySelection(EarlySelectionConfig(warmup=1, rungs=[1], reduction_factor=2))
    assert sel.on_epoch("a", 1, 0.9, 10) == CONTINUE, "a rung decides once it holds 2 trials"
    assert sel.on_epoch("b", 1, 0.5, 20) == STOP, "dominated by a"
    assert sel.on_epoch("c", 1, 0.95, 5) == CONTINUE
    assert sel.on_epoch("d", 2, 0.1, 99) == CONTINUE, "not a rung"
    assert "rung 1" in sel.reasons["b"]


def test_quantile():
    assert _quantile([1, 2, 3, 4], 0.5) == 2.5 and _quantile([5], 0.3) == 5


@pytest.fixture(scope="module")
def stopped_search(ray_local, tmp_path_factory, digits_search):
    work = tmp_path_factory.mktemp("early")
    cfg = parse_config(digits_search(
        work, "early", seed=5, space={"channel_ratio": {"low": 0.125, "high": 1.0, "step": 0.125}},
        sampler={"name": "random"},
        early_stop={"enabled": True, "warmup": 2, "dominated_by": 1, "bucket_quantile": None, "rungs": [1]},
        budget={"trials": 8, "concurrency": 2}, finetune={"epochs": 2, "batch_size": 64}))
    return cfg, run_search(cfg), work


def test_stopped_trials_are_recorded_honestly(stopped_search):
    cfg, outcome, work = stopped_search
    client = MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("early")
    children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == "trial"]
    stopped = [r for r in children if r.data.tags.get(STATUS_TAG) == "early-stopped"]
    assert stopped, "dominated_by=1 after 2 trials must stop someone"
    for r in stopped:
        assert r.info.status == "KILLED" and r.data.tags[REASON_TAG]
        assert "test_acc" not in r.data.metrics
    assert {r["trial_id"] for r in outcome.front}.isdisjoint({r.data.tags["prunetune.trial_id"] for r in stopped})
    study = optuna.load_study(study_name=f"early/{outcome.target.parent_run_id}",
                              storage=f"sqlite:///{work / 'mlflow-optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == len(stopped)
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(children) - len(stopped)
    assert all(t.values is None for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
