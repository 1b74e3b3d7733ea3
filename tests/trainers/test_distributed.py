"""DeepSpeed fine-tuning on several Ray workers, CPU path: gloo ranks on a real local Ray (loopback).

Real components throughout: Ray actors, torch.distributed over gloo on 127.0.0.1, DeepSpeed
engines (ZeRO 1, 2, 3, bf16 autocast), a Ray Tune trial with a placement group, and
scikit-learn's digits. The first DeepSpeed start on a machine JIT-compiles DeepSpeed's shm op
(42-66 s on a 2-core machine, cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions afterwards).
"""

import math
import time

import pytest
import torch

from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.distributed import (DeepSpeedConfig, DeepSpeedTrainer, distributed_train_epochs,
                                            micro_batch_size, steps_per_epoch, trial_resources)
from prunetune.trainers.finetune import evaluate
from prunetune.trainers.models import build_model
from prunetune.trainers.recipe import TrainRecipe

RECIPE = TrainRecipe(epochs=2, batch_size=64, lr=0.05)


@pytest.fixture(scope="module")
def ray_cluster():
    """Loopback Ray with 2 CPUs; reuses the session's Ray when another module started it."""
    import ray

    from prunetune.cluster.connect import connect, disconnect

    started_here = not ray.is_initialized()
    connect(None, num_cpus=2)
    yield
    if started_here:
        disconnect()


@pytest.fixture(scope="module")
def splits(cache_dir):
    from prunetune.trainers.data import DataConfig, load_splits

    return load_splits(DataConfig(name="digits"), seed=0, cache_dir=cache_dir)   # 8x8, 10 classes


def fresh_model(seed=0):
    torch.manual_seed(seed)
    return build_model("cifar:resnet8", in_channels=1, num_classes=10)


def cosine_lr(step, total, lr=RECIPE.lr):
    return lr * (1 + math.cos(math.pi * step / total)) / 2


def ours_alive():
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("prunetune-deepspeed-")]


def wait_until_gone(timeout=30.0):
    deadline = time.monotonic() + timeout
    while ours_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return ours_alive()


def test_config_and_resources():
    assert DeepSpeedConfig().zero_stage == 1 and DeepSpeedConfig().resolve_backend(0) == "gloo"
    assert DeepSpeedConfig().resolve_backend(1) == "nccl"
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedConfig(zero_stage=4)
    with pytest.raises(ValueError, match="extra"):
        DeepSpeedConfig(stage=1)
    with pytest.raises(ValueError, match="nccl"):
        DeepSpeedConfig(backend="nccl").resolve_backend(0)
    cfg = DeepSpeedConfig(zero_stage=2, bf16=True, gradient_clipping=1.0).to_deepspeed(32, 2)
    assert cfg["train_batch_size"] == 64 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["torch_autocast"]["enabled"] and cfg["gradient_clipping"] == 1.0 and "bf16" not in cfg
    with pytest.raises(ValueError, match="divisible by workers"):
        micro_batch_size(64, 3)
    assert steps_per_epoch(1293, 64, 2) == math.ceil(647 / 32)
    assert trial_resources(2, 4, 1, driver_cpus=2).bundles == [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0},
                                                                {"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(ValueError, match="one DeepSpeed rank per GPU"):
        trial_resources(2, 1, 0.5)


@pytest.fixture(scope="module")
def zero1_run(ray_cluster, splits):
    """2 gloo workers, ZeRO-1, distilling from a teacher, 2 epochs: the reports and the trainer."""
    teacher = fresh_model(seed=1).eval()
    t0 = time.perf_counter()
    with DeepSpeedTrainer(fresh_model(), splits.train, splits.val, RECIPE, workers=2, cpus_per_worker=1,
                          ds=DeepSpeedConfig(zero_stage=1), teacher=teacher,
                          distill=DistillConfig(weight=0.3)) as trainer:
        started = time.perf_counter() - t0
        reports = [trainer.run_epoch(), trainer.run_epoch()]
        actors = list(trainer.actors)
    print(f"\nZeRO-1 2 workers: start {started:.1f} s, epochs {[round(r.stats.seconds, 2) for r in reports]} s, "
          f"setup phases {trainer.setup_seconds[0]}")
    return reports, actors


@pytest.mark.slow
def test_zero1_two_workers_train_agree_and_checkpoint(zero1_run, splits):
    import ray

    reports, actors = zero1_run
    first, second = reports
    assert [r.stats.epoch for r in reports] == [1, 2]
    assert second.stats.train_loss < first.stats.train_loss
    assert second.stats.val_acc > 0.5                      # 10 classes: chance is 0.1
    for r in reports:                                      # every rank holds the same weights
        assert len(r.digests) == 2 and r.digests[0] == r.digests[1]
    steps = steps_per_epoch(len(splits.train), RECIPE.batch_size, 2)
    assert first.lr == pytest.approx(RECIPE.lr)
    assert second.lr == pytest.approx(cosine_lr(steps, 2 * steps))

    model = fresh_model(seed=2)
    reference = model.state_dict()
    state = second.state_dict
    assert state.keys() == reference.keys()
    assert all(v.device.type == "cpu" and v.dtype == reference[k].dtype for k, v in state.items())
    model.load_state_dict(state)
    acc, loss = evaluate(model, splits.val, device=torch.device("cpu"))
    assert acc == pytest.approx(second.stats.val_acc) and loss == pytest.approx(second.stats.val_loss, rel=1e-4)

    assert wait_until_gone() == []                         # `with` exit killed the workers
    for actor in actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.where.remote(), timeout=30)


@pytest.mark.slow
def test_resume_from_epoch_1_zero3_bf16(zero1_run, splits):
    """Weights after epoch 1 + start_epoch=1: the schedule continues where it was (ZeRO-3, bf16,
    student at 6x6 while the data is 8x8)."""
    reports, _ = zero1_run
    model = fresh_model(seed=3)
    model.load_state_dict(reports[0].state_dict)
    trainer = DeepSpeedTrainer(model, splits.train, splits.val, RECIPE, workers=2, start_epoch=1,
                               ds=DeepSpeedConfig(zero_stage=3, bf16=True), resolution=6)
    t0 = time.perf_counter()
    with trainer:
        started = time.perf_counter() - t0
        report = trainer.run_epoch()
        with pytest.raises(RuntimeError, match="all 2 epochs are done"):
            trainer.run_epoch()
    print(f"\nZeRO-3 bf16 resume: start {started:.1f} s, epoch {report.stats.seconds:.2f} s")
    assert report.stats.epoch == 2
    assert report.lr == pytest.approx(reports[1].lr, rel=1e-12)
    assert report.digests[0] == report.digests[1]
    assert report.stats.val_acc > 0.5
    assert all(v.dtype == reports[0].state_dict[k].dtype for k, v in report.state_dict.items())
    model.load_state_dict(report.state_dict)               # ZeRO-3 shards gathered back to full shapes
    acc, _ = evaluate(model, splits.val, device=torch.device("cpu"), resolution=6)
    assert acc == pytest.approx(report.stats.val_acc, abs=0.03)   # fp32 here, bf16 autocast there
    assert trainer.actors == [] and trainer.placement_group is None


@pytest.mark.slow
def test_tune_trial_uses_its_placement_group_and_close_kills_workers(ray_cluster, splits, tmp_path):
    """The production shape: a Tune trial with trial_resources() (1 CPU for itself, 2 x 0.5 CPU
    for the ranks: all 2 CPUs of the cluster, so a placement group of its own could never be
    placed) drives ZeRO-2 workers, and stops after one of two epochs by closing the generator."""
    import ray
    from ray import tune

    train, val, recipe = splits.train, splits.val, RECIPE

    def trainable(config):     # runs in the trial's actor: only closures and prunetune imports
        import time
        import warnings

        import ray
        import torch
        from ray import tune

        from prunetune.trainers.distributed import DeepSpeedConfig, distributed_train_epochs
        from prunetune.trainers.models import build_model

        def ours():
            return [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("prunetune-deepspeed-")]

        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model("cifar:resnet8", in_channels=1, num_classes=10)
        epochs = distributed_train_epochs(model, train, val, recipe, workers=2, cpus_per_worker=0.5,
                                          ds=DeepSpeedConfig(zero_stage=2))
        stats, state = next(epochs)
        alive = len(ours())
        epochs.close()
        deadline = time.monotonic() + 30
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)
        pg = ray.util.get_current_placement_group()
        tune.report({"epoch": stats.epoch, "val_acc": stats.val_acc, "alive": alive, "left": len(ours()),
                     "bundles": pg.bundle_count, "state_keys": len(state)})

    t0 = time.perf_counter()
    result = tune.Tuner(
        tune.with_resources(trainable, trial_resources(2, 0.5, 0, driver_cpus=1)),
        run_config=tune.RunConfig(name="deepspeed", storage_path=str(tmp_path), verbose=0),
    ).fit().get_best_result(metric="val_acc", mode="max")
    print(f"\nTune trial, ZeRO-2, 1 epoch: {time.perf_counter() - t0:.1f} s")
    assert result.error is None
    m = result.metrics
    assert m["epoch"] == 1 and m["val_acc"] > 0.3 and m["bundles"] == 3
    assert m["alive"] == 2 and m["left"] == 0
    assert m["state_keys"] == len(fresh_model().state_dict())


@pytest.mark.slow
def test_worker_error_surfaces_and_kills_the_workers(ray_cluster, splits):
    """A model with 5 outputs on 10-class labels fails in the first step on every rank: the
    error reaches the caller and the generator's cleanup kills the workers."""
    import ray

    torch.manual_seed(0)
    wrong = build_model("cifar:resnet8", in_channels=1, num_classes=5)
    epochs = distributed_train_epochs(wrong, splits.train, splits.val, RECIPE, workers=2,
                                      ds=DeepSpeedConfig(zero_stage=0))
    with pytest.raises(ray.exceptions.RayTaskError, match="out of bounds"):
        next(epochs)
    assert wait_until_gone() == []
