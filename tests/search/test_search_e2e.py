"""One short real search, end to end: real Ray on loopback, real MLflow sqlite, real training
on real Fashion-MNIST; then the MLflow record is checked and a front subnet is rebuilt."""

import ipaddress
import os
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from prunetune.search.cli import main
from prunetune.search.config import parse_config
from prunetune.search.runner import run_search
from prunetune.search.tracking import PARENT_TAG, ROLE_TAG, TRIAL_TAG
from prunetune.spaces import load_subnet, rebuild
from prunetune.trainers.data import load_splits
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.models import build_model

TRIALS = 4
EPOCHS = 2


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory, fashion_mnist_root, cache_dir):
    work = tmp_path_factory.mktemp("search")
    cfg = parse_config({
        "name": "e2e", "seed": 3,
        "model": {"name": "cifar:resnet20"},
        "data": {"name": "fashion-mnist", "root": str(fashion_mnist_root), "limit_train": 1200, "image_size": 14,
                 "val_fraction": 0.2},
        "parent": {"recipe": {"epochs": 2, "lr": 0.05, "batch_size": 64}},
        "space": {"resolutions": [10, 14]},
        "budget": {"trials": TRIALS, "concurrency": 2},
        "finetune": {"epochs": EPOCHS, "lr": 0.02, "batch_size": 64},
        "probes": {"size": 64},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
        "ray": {"storage_path": str(work / "ray_results")},
        "cache_dir": str(cache_dir),
    })
    outcome = run_search(cfg)
    return cfg, outcome, MlflowClient(cfg.tracking.uri)


def _runs(client, outcome):
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "search"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    return parents, children


def test_ray_listens_only_on_loopback(ray_local):
    import ray

    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    me = psutil.Process(os.getpid())
    pids = {p.pid for p in me.children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "expected Ray's servers among this process's children"
    assert all(_is_loopback(c.laddr.ip) for c in listening), [c.laddr for c in listening]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_one_parent_run_and_one_finished_child_per_trial(search):
    cfg, outcome, client = search
    parents, children = _runs(client, outcome)
    assert [p.info.run_id for p in parents] == [outcome.target.parent_run_id]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == TRIALS
    assert {c.data.tags[PARENT_TAG] for c in children} == {outcome.target.parent_run_id}
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == TRIALS
    for c in children:
        assert c.info.status == "FINISHED"
        assert {"ch.layer1", "depth.layer2", "resolution", "finetune.lr", "importance"} <= set(c.data.params)
        history = client.get_metric_history(c.info.run_id, "val_acc")
        assert sorted(m.step for m in history) == list(range(EPOCHS + 1))
        assert 0.0 <= c.data.metrics["test_acc"] <= 1.0
        assert c.data.metrics["macs"] <= parents[0].data.metrics["parent_macs"]


def test_front_artifacts_and_tags(search):
    cfg, outcome, client = search
    parent = outcome.target.parent_run_id
    names = {a.path for a in client.list_artifacts(parent, "front")}
    assert {"front/front.json", "front/front.csv", "front/front.png", "front/trials.csv", "front/front.html"} <= names
    assert any(a.path == "config.yaml" for a in client.list_artifacts(parent))
    _, children = _runs(client, outcome)
    front_ids = {r["trial_id"] for r in outcome.front}
    assert front_ids and front_ids <= {c.data.tags[TRIAL_TAG] for c in children}
    tagged = {c.data.tags[TRIAL_TAG] for c in children if c.data.tags.get("pareto_front") == "true"}
    assert tagged == front_ids
    # the front is non-dominated: no finished trial beats a member on both objectives
    finished = [(c.data.metrics["val_acc"], c.data.metrics["macs"]) for c in children]
    for r in outcome.front:
        assert not any(a >= r["val_acc"] and m <= r["macs"] and (a, m) != (r["val_acc"], r["macs"])
                       for a, m in finished)


def test_optuna_study_lives_beside_the_tracking_database(search):
    import optuna

    cfg, outcome, _ = search
    db = Path(cfg.tracking.uri.removeprefix("sqlite:///"))
    storage = f"sqlite:///{db.with_name('mlflow-optuna.db')}"
    study = optuna.load_study(study_name=f"e2e/{outcome.target.parent_run_id}", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == TRIALS and all(len(t.values) == 2 for t in done)
    assert {r["val_acc"] for r in outcome.records} == {t.values[0] for t in done}


def test_front_was_live_in_mlflow(search):
    cfg, outcome, client = search
    parent = outcome.target.parent_run_id
    hv = client.get_metric_history(parent, "hypervolume")
    assert [m.step for m in hv] == list(range(1, TRIALS + 1)), "one point per finished trial"
    values = [m.value for m in hv]
    assert values == sorted(values) and values[-1] == pytest.approx(outcome.hypervolume)
    by_time = client.get_metric_history(parent, "hypervolume_by_time")
    assert [m.value for m in by_time] == values and [m.step for m in by_time] == sorted(m.step for m in by_time)
    sizes = client.get_metric_history(parent, "front_size")
    assert sizes[-1].value == len(outcome.front)


def test_front_subnet_rebuilds_and_reproduces_its_test_accuracy(search, cache_dir, tmp_path):
    cfg, outcome, client = search
    best = max(outcome.front, key=lambda r: r["val_acc"])
    local = Path(client.download_artifacts(best["mlflow_run_id"], "subnet", str(tmp_path)))
    spec, weights = load_subnet(local)
    assert spec.vector.resolution == int(best["resolution"])
    splits = load_splits(cfg.data, seed=cfg.seed, cache_dir=cache_dir)
    skeleton = build_model(cfg.model.name, in_channels=splits.in_channels, num_classes=splits.num_classes)
    model = rebuild(skeleton, spec)
    model.load_state_dict(weights, strict=True)
    acc, _ = evaluate(model, splits.test, device=torch.device("cpu"), resolution=spec.resolution)
    assert acc == pytest.approx(best["test_acc"], abs=1e-9)


def test_front_command_prints_the_front(search, capsys):
    cfg, outcome, _ = search
    assert main(["front", "e2e", "--tracking-uri", cfg.tracking.uri]) == 0
    out = capsys.readouterr().out
    for r in outcome.front:
        assert r["trial_id"] in out
    assert main(["front", "missing-exp", "--tracking-uri", cfg.tracking.uri]) == 2
