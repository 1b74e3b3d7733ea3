"""Fine-tuning one candidate on several workers with DeepSpeed (ZeRO), driven epoch by epoch.

`distributed_train_epochs` keeps the contract of `trainers.finetune.train_epochs` (SGD with
momentum/Nesterov/weight decay, cosine annealing per step over all epochs, optional knowledge
distillation, validation after each epoch) but trains data-parallel on `workers` Ray actors, one
DeepSpeed rank each, and yields `(EpochStats, state_dict)` after every epoch: the full fp32 model
gathered from all ranks, on CPU, tensors only, ready to be checkpointed with `torch.save`.

Example (Ray already started on loopback, e.g. by `prunetune.cluster.connect`):
    >>> ds = DeepSpeedConfig(zero_stage=1)
    >>> for stats, state in distributed_train_epochs(model, splits.train, splits.val, recipe,
    ...                                               workers=2, cpus_per_worker=1, gpus_per_worker=0, ds=ds):
    ...     print(stats.epoch, stats.val_acc)

Semantics
- Batch: `recipe.batch_size` is the *global* batch. Each worker takes `batch_size / workers`
  samples per step (it must divide evenly) and DeepSpeed averages the gradients, so one step sees
  the same number of samples and uses the same learning rate as the single-process loop.
- Data: each worker reads its own shard through a seeded `DistributedSampler` (set_epoch per
  epoch, padded so every rank runs the same number of steps). Steps per epoch are therefore
  ceil(ceil(n / workers) / micro_batch), and the cosine schedule spans epochs x that count.
- Validation is sharded across the ranks (every rank runs the same number of forward passes, as
  ZeRO-3 needs) and summed with all_reduce. BatchNorm running statistics are averaged across
  ranks at the end of each epoch, so all ranks evaluate and checkpoint the same model.
- Resume: pass the weights saved after epoch k as `model` and `start_epoch=k`; the schedule is
  fast-forwarded by k epochs of steps, so the first step uses the learning rate the uninterrupted
  run would have used, and the data order is the same (the sampler is seeded per epoch number).
  The SGD momentum buffers are NOT restored, unlike `finetune.Trainer`: momentum restarts from
  zero (DeepSpeed's own checkpoints would carry it, but they are pickles, never loaded here).
- bf16: DeepSpeed's `torch_autocast` section (bf16 compute for Conv/Linear, their gradients
  reduced in bf16, fp32 master weights). DeepSpeed's `bf16` section casts the weights themselves
  to bf16; it fails on BatchNorm on CPU (bf16 weights, fp32 running stats) and would keep the
  running statistics in bf16 if told to cast buffers, so prunetune's CNNs use autocast.
- Distillation: every worker holds a copy of the teacher (fp32, eval mode, not sharded).
- The model, teacher and datasets reach the workers once through Ray's object store (Ray's own
  serialisation between its processes; no file is unpickled).
- Not supported here: the `after_backward` / `after_step` hooks of `train_epochs` (policies
  that edit gradients or re-apply masks run single-process); frozen parameters under ZeRO-3.

Execution: a placement group, not Ray Train. The caller (a Ray Tune trial in production) starts
one actor per rank, and calls `run_epoch` on all of them once per epoch, so it can report,
checkpoint or stop between epochs and every trial stays an ordinary event generator. Inside a
Tune trial whose resources come from `trial_resources`, the workers use bundles 1..N of the
trial's own placement group (bundle 0 runs the trial), so Tune counts a multi-GPU candidate's
GPUs as part of the trial and never starts more candidates than fit. Outside a placement group
(a script, a test) one is created with N bundles and removed afterwards. Ray Train 2.60 was
considered: its TorchTrainer (Train V2) runs inside a Tune function only as a separate job with a
controller actor, workers reserved outside the trial's resources, metrics relayed by callback and
checkpoints exchanged through storage paths; a blocking `fit()` does not fit a trial that yields
events and hands weights to the caller between epochs.

DeepSpeed on CPU (measured with deepspeed 0.19.8, torch 2.14.1, no oneCCL):
- The accelerator is chosen per process; workers set DS_ACCELERATOR to "cpu" (or "cuda" when
  they hold a GPU) before importing deepspeed. The CPU accelerator's backend is "ccl" only with
  oneccl_bindings_for_pytorch installed, otherwise gloo; prunetune passes the backend explicitly.
- `deepspeed.init_distributed` builds DeepSpeed's shared-memory communication op
  (deepspeed_shm_comm, JIT: 42 s idle, 66-86 s loaded on a 2-core machine) when it finds it
  compatible. It is cached under $TORCH_EXTENSIONS_DIR, but rebuilt whenever a process with other
  compile flags loaded it last (seen here: two flag sets alternating between a test process and
  Tune trial workers, a rebuild each time). The op is only used for inference all-reduce when
  LOCAL_SIZE equals the world size, which prunetune never sets, so workers mark it incompatible
  (`deepspeed.ops.__compatible_ops__`) and DeepSpeed skips it.
- ZeRO stages 0, 1, 2 and 3 all train with gloo; the ranks end each step with identical weights.
  ZeRO with torch's SGD needs "zero_allow_untested_optimizer" (SGD's only state is momentum).

Networking: rank 0 binds the rendezvous socket itself on its node IP (loopback in tests) and
hands it to torch's TCPStore (`master_listen_fd`), so the store never listens on all interfaces
and no other process can take the port; gloo (and NCCL's bootstrap) are pinned to the interface
that carries the node IP unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are already set.
Ray is never started here: call this with Ray initialised (loopback-only for local runs).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import Dataset

from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.finetune import EpochStats
from prunetune.trainers.recipe import TrainRecipe

PLACEMENT_TIMEOUT_S = 600.0
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
VAL_BATCH_PER_RANK = 256


class DeepSpeedConfig(BaseModel):
    """How a multi-worker candidate is fine-tuned (`resources.deepspeed` in an experiment)."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(default=1, ge=0, le=3,
                            description="ZeRO stage: 0 plain data parallel, 1 shard optimizer state, "
                                        "2 + gradients, 3 + parameters")
    bf16: bool = Field(default=False, description="bf16 autocast for Conv/Linear (fp32 master weights "
                                                  "and BatchNorm statistics); gradients reduced in bf16")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="torch.distributed backend; auto = nccl when workers have GPUs, gloo otherwise")
    gradient_clipping: float | None = Field(default=None, gt=0,
                                            description="clip the global gradient norm to this value (off when unset)")

    def resolve_backend(self, gpus_per_worker: float) -> str:
        """The backend workers with `gpus_per_worker` GPUs each use; raises on nccl without GPUs."""
        if self.backend == "nccl" and gpus_per_worker <= 0:
            raise ValueError("deepspeed.backend 'nccl' needs GPUs (resources.gpu > 0); use 'gloo' or 'auto' on CPU")
        if self.backend == "auto":
            return "nccl" if gpus_per_worker > 0 else "gloo"
        return self.backend

    def to_deepspeed(self, micro_batch: int, workers: int) -> dict[str, Any]:
        """The DeepSpeed config dict (the JSON `deepspeed.initialize` takes)."""
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * workers,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2 ** 31 - 1,
            "wall_clock_breakdown": False,
        }
        if self.bf16:
            cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if self.gradient_clipping is not None:
            cfg["gradient_clipping"] = self.gradient_clipping
        return cfg


@dataclass(frozen=True)
class DataParallel:
    """A candidate's multi-worker fine-tune: `workers` DeepSpeed ranks of `cpus`/`gpus` each."""

    workers: int
    cpus: float
    gpus: float
    ds: DeepSpeedConfig


def micro_batch_size(batch_size: int, workers: int) -> int:
    """Per-worker batch for a global `batch_size`; raises unless it divides evenly."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if batch_size % workers:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by "
                         f"workers ({workers}); e.g. use {batch_size - batch_size % workers or workers}")
    return batch_size // workers


def steps_per_epoch(n_train: int, batch_size: int, workers: int) -> int:
    """Optimiser steps per epoch on every rank (padded DistributedSampler shards)."""
    return max(1, math.ceil(math.ceil(n_train / workers) / micro_batch_size(batch_size, workers)))


def trial_resources(workers: int, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, *,
                    driver_cpus: float = 1.0, strategy: str = "PACK"):
    """Placement group for a Tune trial that fine-tunes on `workers` DeepSpeed ranks.

    Bundle 0 runs the trial itself (pruning, CKA, test accuracy, driving the workers); bundles
    1..workers hold one rank each. Use with `tune.with_resources(trainable, trial_resources(...))`.

    >>> trial_resources(2, 4, 1).bundles
    [{'CPU': 1.0}, {'CPU': 4.0, 'GPU': 1.0}, {'CPU': 4.0, 'GPU': 1.0}]
    """
    from ray import tune

    _check_resources(workers, cpus_per_worker, gpus_per_worker)
    worker = {"CPU": float(cpus_per_worker)}
    if gpus_per_worker:
        worker["GPU"] = float(gpus_per_worker)
    return tune.PlacementGroupFactory([{"CPU": float(driver_cpus)}] + [dict(worker) for _ in range(workers)],
                                      strategy=strategy)


def _check_resources(workers: int, cpus: float, gpus: float) -> None:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if cpus <= 0:
        raise ValueError(f"cpus per worker must be > 0, got {cpus}")
    if gpus not in (0, 1):
        raise ValueError(f"gpus per worker must be 0 or 1 (one DeepSpeed rank per GPU), got {gpus}")


@dataclass(frozen=True)
class EpochReport:
    """One epoch on all ranks: the stats, the consolidated weights, and per-rank facts."""

    stats: EpochStats
    state_dict: dict[str, torch.Tensor]
    lr: float                   # learning rate of the epoch's first step
    digests: list[str]          # sha256 of each rank's consolidated state (all equal)


@dataclass(frozen=True)
class _Plan:
    recipe: TrainRecipe
    ds: dict[str, Any]
    backend: str
    micro_batch: int
    steps_per_epoch: int
    start_epoch: int
    seed: int
    resolution: int | None
    distill: DistillConfig | None
    threads: int


class DeepSpeedTrainer:
    """The worker group behind `distributed_train_epochs`: `start()`, `run_epoch()` per epoch,
    `close()` (also on `with` exit). Constructing it only stores the arguments."""

    def __init__(self, model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
                 workers: int, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 ds: DeepSpeedConfig | None = None, resolution: int | None = None, seed: int = 0,
                 teacher: nn.Module | None = None, distill: DistillConfig | None = None,
                 start_epoch: int = 0, placement_timeout_s: float = PLACEMENT_TIMEOUT_S):
        self.model, self.train, self.val, self.recipe = model, train, val, recipe
        self.workers, self.cpus_per_worker, self.gpus_per_worker = workers, cpus_per_worker, gpus_per_worker
        self.ds = ds or DeepSpeedConfig()
        self.resolution, self.seed, self.teacher, self.distill = resolution, seed, teacher, distill
        self.start_epoch, self.placement_timeout_s = start_epoch, placement_timeout_s
        self.actors: list = []
        self.placement_group = None
        self.owns_placement_group = False
        self.epoch = start_epoch
        self.setup_seconds: list[dict[str, float]] = []     # per rank: seconds per setup phase

    def __enter__(self) -> DeepSpeedTrainer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Place and start the workers, join them in one process group, build their engines."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        _check_resources(self.workers, self.cpus_per_worker, self.gpus_per_worker)
        if not 0 <= self.start_epoch <= self.recipe.epochs:
            raise ValueError(f"start_epoch {self.start_epoch} outside 0..{self.recipe.epochs} (recipe.epochs)")
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: start it first (prunetune.cluster.connect binds to loopback)")
        backend = self.ds.resolve_backend(self.gpus_per_worker)
        micro = micro_batch_size(self.recipe.batch_size, self.workers)
        use_teacher = self.teacher is not None and self.distill is not None and self.distill.weight > 0
        plan = _Plan(self.recipe, self.ds.to_deepspeed(micro, self.workers), backend, micro,
                     steps_per_epoch(len(self.train), self.recipe.batch_size, self.workers), self.start_epoch,
                     self.seed, self.resolution, self.distill if use_teacher else None,
                     max(1, int(self.cpus_per_worker)))
        bundles = self._acquire_placement_group()
        payload = ray.put((self.model, self.teacher if use_teacher else None, self.train, self.val))
        group = uuid.uuid4().hex[:8]
        remote = ray.remote(_Worker)
        for rank, bundle in enumerate(bundles):
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=bundle)
            self.actors.append(remote.options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, scheduling_strategy=strategy,
                name=f"prunetune-deepspeed-{group}-rank{rank}", max_restarts=0,
            ).remote(rank, self.workers, self.gpus_per_worker > 0))
        where = _gather([a.where.remote() for a in self.actors])
        port = _gather([self.actors[0].listen.remote()])[0]
        self.setup_seconds = _gather([a.setup.remote(where[0]["ip"], port, *_local_layout(where, rank), plan,
                                                     payload) for rank, a in enumerate(self.actors)])

    def _acquire_placement_group(self) -> list[int]:
        """Bundle indices for ranks 0..N-1: the current trial's bundles 1..N, or a new group's 0..N-1."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group

        need = {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}
        current = get_current_placement_group()
        if current is not None:
            specs = current.bundle_specs
            workers_specs = specs[1:1 + self.workers]
            if len(workers_specs) < self.workers or any(
                    s.get(k, 0) + 1e-9 < v for s in workers_specs for k, v in need.items() if v):
                raise RuntimeError(
                    f"this trial's placement group has bundles {specs}; {self.workers} DeepSpeed workers need "
                    f"bundles 1..{self.workers} with at least {need}: give the trainable "
                    f"trial_resources({self.workers}, {self.cpus_per_worker}, {self.gpus_per_worker})")
            self.placement_group = current
            return list(range(1, self.workers + 1))
        bundle = {k: v for k, v in need.items() if v}
        self.placement_group = placement_group([dict(bundle) for _ in range(self.workers)], strategy="PACK")
        self.owns_placement_group = True
        try:
            ray.get(self.placement_group.ready(), timeout=self.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"the cluster could not place {self.workers} workers of {bundle} within "
                               f"{self.placement_timeout_s:.0f} s (cluster: {ray.cluster_resources()})") from None
        return list(range(self.workers))

    def run_epoch(self) -> EpochReport:
        """Train the next epoch on all ranks in lock-step and validate it."""
        if not self.actors:
            raise RuntimeError("start() the trainer first")
        if self.epoch >= self.recipe.epochs:
            raise RuntimeError(f"all {self.recipe.epochs} epochs are done")
        self.epoch += 1
        out = _gather([a.run_epoch.remote(self.epoch) for a in self.actors])
        return EpochReport(out[0]["stats"], out[0]["state"], out[0]["lr"], [o["digest"] for o in out])

    def close(self) -> None:
        """Kill the workers and remove the placement group if this trainer created it. Idempotent."""
        import ray

        actors, self.actors = self.actors, []
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if self.owns_placement_group and self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
        self.placement_group, self.owns_placement_group = None, False


def distributed_train_epochs(model: nn.Module, train: Dataset, val: Dataset, recipe: TrainRecipe, *,
                             workers: int, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                             ds: DeepSpeedConfig | None = None, resolution: int | None = None, seed: int = 0,
                             teacher: nn.Module | None = None, distill: DistillConfig | None = None,
                             start_epoch: int = 0) -> Iterator[tuple[EpochStats, dict[str, torch.Tensor]]]:
    """`train_epochs` on `workers` DeepSpeed ranks: yields (stats, full CPU state_dict) per epoch.

    Epochs start_epoch+1..recipe.epochs; `model` is only read (load the returned state_dict into
    it to keep the result). The workers are killed when the generator finishes, fails or is
    closed early (e.g. the trial is stopped), so a caller may stop consuming at any epoch.
    """
    if start_epoch >= recipe.epochs:
        return
    trainer = DeepSpeedTrainer(model, train, val, recipe, workers=workers, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, ds=ds, resolution=resolution, seed=seed,
                               teacher=teacher, distill=distill, start_epoch=start_epoch)
    try:
        trainer.start()
        while trainer.epoch < recipe.epochs:
            report = trainer.run_epoch()
            yield report.stats, report.state_dict
    finally:
        trainer.close()


def _gather(refs: list) -> list:
    """ray.get on all refs, raising the first failure at once: when one rank dies, the others
    sit in a collective and would otherwise block ray.get until the collective timeout."""
    import ray

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def _local_layout(where: list[dict], rank: int) -> tuple[int, str | None]:
    """(LOCAL_RANK, CUDA_VISIBLE_DEVICES) for `rank`. GPU ranks on one node all see the node's
    GPUs of this group (so NCCL can use peer-to-peer links) and pick theirs by local rank."""
    node = where[rank]["node"]
    peers = [r for r, w in enumerate(where) if w["node"] == node]
    gpus = sorted({g for r in peers for g in where[r]["gpus"]}, key=lambda g: (len(g), g))
    if not where[rank]["gpus"]:
        return peers.index(rank), None
    return gpus.index(where[rank]["gpus"][0]), ",".join(gpus)


def _interface_of(ip: str) -> str | None:
    """Name of the network interface that carries `ip` (any loopback address maps to loopback)."""
    import ipaddress

    import psutil

    target = ipaddress.ip_address(ip)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            try:
                addr = ipaddress.ip_address(a.address.split("%")[0])
            except ValueError:
                continue
            if addr == target or (target.is_loopback and addr.is_loopback and addr.version == target.version):
                return name
    return None


class _Worker:
    """One DeepSpeed rank (a Ray actor). Methods run in order: where, listen (rank 0), setup,
    then run_epoch once per epoch."""

    def __init__(self, rank: int, world: int, gpu: bool):
        self.rank, self.world, self.gpu = rank, world, gpu
        os.environ["DS_ACCELERATOR"] = "cuda" if gpu else "cpu"
        self._listener = None

    def where(self) -> dict:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "node": ray.get_runtime_context().get_node_id(),
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def listen(self) -> int:
        """Bind the rendezvous socket on this node's IP (port chosen by the OS); keep it open."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((ip, 0))
        self._listener.listen(128)
        return self._listener.getsockname()[1]

    def setup(self, master_addr: str, port: int, local_rank: int, visible: str | None, plan: _Plan,
              payload: tuple) -> dict[str, float]:
        """Join the process group and build the DeepSpeed engine; returns seconds per phase."""
        import logging

        import ray

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world), LOCAL_RANK=str(local_rank))
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        iface = _interface_of(ray.util.get_node_ip_address())
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
        torch.set_num_threads(plan.threads)
        self.plan = plan
        self.device = torch.device("cuda", local_rank) if self.gpu else torch.device("cpu")
        if self.gpu:
            torch.cuda.set_device(self.device)

        import torch.distributed as dist

        t0 = time.perf_counter()
        if self.rank == 0:
            store = dist.TCPStore(master_addr, port, self.world, is_master=True, timeout=COLLECTIVE_TIMEOUT,
                                  master_listen_fd=self._listener.detach())
        else:
            store = dist.TCPStore(master_addr, port, self.world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        dist.init_process_group(plan.backend, store=store, rank=self.rank, world_size=self.world,
                                timeout=COLLECTIVE_TIMEOUT, device_id=self.device if self.gpu else None)

        t1 = time.perf_counter()
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        # Skip the shared-memory comm op (see the module docstring): unused here, and its JIT
        # build costs about a minute and is redone whenever two processes' compile flags differ.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        t2 = time.perf_counter()
        deepspeed.init_distributed(dist_backend=plan.backend)   # wraps the process group made above
        t3 = time.perf_counter()

        model, teacher, train, val = payload
        self.dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        torch.manual_seed(plan.seed)
        r = plan.recipe
        opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                              nesterov=r.nesterov and r.momentum > 0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, r.epochs * plan.steps_per_epoch))
        with warnings.catch_warnings():      # "lr_scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore")
            for _ in range(plan.start_epoch * plan.steps_per_epoch):
                sched.step()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=plan.ds)
        t4 = time.perf_counter()
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        self.train_sampler = torch.utils.data.DistributedSampler(
            train, num_replicas=self.world, rank=self.rank, shuffle=True, seed=plan.seed, drop_last=False)
        self.train_loader = torch.utils.data.DataLoader(train, batch_size=plan.micro_batch,
                                                        sampler=self.train_sampler, num_workers=0)
        self.val = val
        return {"process_group": t1 - t0, "import_deepspeed": t2 - t1, "init_distributed": t3 - t2,
                "initialize": t4 - t3}

    def run_epoch(self, epoch: int) -> dict:
        from prunetune.trainers.distill import distilled_loss
        from prunetune.trainers.finetune import resize

        t0 = time.perf_counter()
        plan, engine = self.plan, self.engine
        self.train_sampler.set_epoch(epoch)
        lr = float(engine.get_lr()[0])
        engine.train()
        total, n = 0.0, 0
        for x, y in self.train_loader:
            x, y = x.to(self.device), y.to(self.device)
            with torch.no_grad():
                teacher_logits = self.teacher(x).float() if self.teacher is not None else None
            loss = distilled_loss(engine(resize(x, plan.resolution)).float(), y, teacher_logits, plan.distill)
            engine.backward(loss)
            engine.step()
            total += loss.item() * y.numel()
            n += y.numel()
        self._average_batchnorm_stats()
        correct, val_loss, val_n = self._validate()
        sums = torch.tensor([total, n, correct, val_loss, val_n], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(sums)
        total, n, correct, val_loss, val_n = sums.tolist()
        seconds = time.perf_counter() - t0
        state = self._consolidated_state()
        digest = hashlib.sha256()
        for k in sorted(state):
            digest.update(k.encode())
            digest.update(state[k].reshape(-1).view(torch.uint8).numpy().tobytes())
        stats = EpochStats(epoch, total / max(n, 1), correct / max(val_n, 1), val_loss / max(val_n, 1), seconds)
        return {"stats": stats, "lr": lr, "digest": digest.hexdigest(), "state": state if self.rank == 0 else None}

    def _average_batchnorm_stats(self) -> None:
        import torch.distributed as dist

        for m in self.engine.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for buf in (m.running_mean, m.running_var):
                    if buf is not None:
                        dist.all_reduce(buf)
                        buf.div_(self.world)

    @torch.no_grad()
    def _validate(self) -> tuple[float, float, float]:
        """Sums over this rank's share of `val`: chunks of VAL_BATCH_PER_RANK x world samples, one
        slice per rank; an empty slice forwards one sample with weight 0 so every rank runs the
        same number of forward passes (ZeRO-3 gathers parameters collectively in forward)."""
        import torch.nn.functional as F

        from prunetune.trainers.finetune import resize

        self.engine.eval()
        size, b = len(self.val), VAL_BATCH_PER_RANK
        correct, loss, n = 0.0, 0.0, 0
        for start in range(0, size, b * self.world):
            lo, hi = min(start + self.rank * b, size), min(start + (self.rank + 1) * b, size)
            idx, weight = (list(range(lo, hi)), 1.0) if hi > lo else ([start], 0.0)
            x, y = torch.utils.data.default_collate([self.val[i] for i in idx])
            x, y = x.to(self.device), y.to(self.device)
            logits = self.engine(resize(x, self.plan.resolution)).float()
            loss += weight * F.cross_entropy(logits, y, reduction="sum").item()
            correct += weight * (logits.argmax(1) == y).sum().item()
            n += hi - lo
        return correct, loss, n

    def _consolidated_state(self) -> dict[str, torch.Tensor]:
        """The full model in its original dtypes on CPU. Collective: every rank calls it (ZeRO-1/2
        gather fp32 partitions, ZeRO-3 parameters); parameters are visited in the same order."""
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        full = {}
        for p in module.parameters():
            value = safe_get_full_fp32_param(p)
            full[id(p)] = (p if value is None else value).detach()
        state = {}
        for k, v in module.state_dict(keep_vars=True).items():
            t = full.get(id(v), v.detach()) if isinstance(v, nn.Parameter) else v.detach()
            state[k] = t.to("cpu", dtype=self.dtypes.get(k, t.dtype), copy=True).contiguous()
        return state
