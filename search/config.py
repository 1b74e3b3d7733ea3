"""The experiment config: one YAML file parsed into pydantic models.

Everything is validated before Ray or MLflow start and before anything is written. A bad
config raises `ConfigError`, whose message names each offending key path
(e.g. `space.channel_ratio.low`); the CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from prunetune.search.constraints import ConstraintsConfig
from prunetune.search.early_selection import EarlySelectionConfig
from prunetune.search.numerical_gradient import GradientConfig
from prunetune.search.policy_space import PolicyConfig
from prunetune.search.samplers import grid_values
from prunetune.spaces import SpaceConfig
from prunetune.spaces.cost import CostConfig
from prunetune.trainers.data import DataConfig
from prunetune.trainers.distill import DistillConfig
from prunetune.trainers.distributed import DataParallel, DeepSpeedConfig, micro_batch_size
from prunetune.trainers.models import build_model, is_known_model, model_names
from prunetune.trainers.policies import POLICIES
from prunetune.trainers.recipe import TrainRecipe

class ConfigError(ValueError):
    """A config that cannot be run; `str()` is the message shown to the user."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    name: str = Field(description="`cifar:resnet20`, `torchvision:resnet18`, ...")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if not is_known_model(v):
            raise ValueError(f"unknown model {v!r}; registered: {', '.join(model_names())}, "
                             "or torchvision:<name>")
        return v

    def check_searchable(self, in_channels: int = 3, size: int = 32) -> None:
        """Raise ValueError when the engine finds nothing to prune in this model."""
        import warnings

        import torch

        from prunetune.spaces import describe

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = describe(build_model(self.name, in_channels=in_channels, num_classes=10),
                         torch.zeros(1, in_channels, size, size))
        if not any(c.groups or c.attention for c in s.channel_stages) and not s.depth_stages:
            raise ValueError(f"{self.name!r}: the engine finds nothing to prune "
                             f"({s.channel_error or 'no channel groups, heads or removable blocks'})")


class ParentConfig(_Strict):
    checkpoint: Path | None = Field(default=None, description="state_dict (.pt/.pth/.safetensors) of a trained parent")
    recipe: TrainRecipe = Field(default_factory=lambda: TrainRecipe(epochs=15),
                                description="how the parent is trained when no checkpoint is given")

    @field_validator("checkpoint")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"file not found: {v}")
        return v


class Objective(_Strict):
    metric: Literal["val_acc", "macs", "params", "latency_ms", "peak_activation_bytes"]
    mode: Literal["max", "min"]


class BudgetConfig(_Strict):
    trials: int = Field(default=12, ge=1)
    concurrency: int = Field(default=2, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)


class SamplerConfig(_Strict):
    name: Literal["nsga2", "tpe", "random", "grid", "gradient"] = "nsga2"
    population_size: int | None = Field(default=None, ge=2,
                                        description="NSGA-II generation size; default max(4, trials // 3)")
    gradient: GradientConfig = Field(default_factory=GradientConfig,
                                     description="settings of the numerical-gradient searcher (name: gradient)")
    storage: str | None = Field(default=None, description="Optuna RDB URL of the study; default beside the tracking "
                                "database (sqlite `NAME.db` -> `NAME-optuna.db`), for optuna-dashboard")


class ResourcesConfig(_Strict):
    cpu: float = Field(default=1, gt=0, description="CPUs per trial (per DeepSpeed worker when `workers` > 1)")
    gpu: float = Field(default=0, ge=0, description="GPUs per trial (per DeepSpeed worker when `workers` > 1: 0 or 1)")
    workers: int = Field(default=1, ge=1, description="> 1: each candidate's final fine-tune runs data-parallel with "
                         "DeepSpeed on this many workers (nccl with GPUs, gloo on CPU) in the trial's placement group")
    trial_cpu: float = Field(default=1, gt=0, description="with DeepSpeed: CPUs of the trial process itself, which "
                             "prunes, measures and drives the workers (bundle 0 of its placement group)")
    deepspeed: DeepSpeedConfig | None = Field(default=None, description="ZeRO stage, bf16 and backend of the "
                                              "multi-worker fine-tune; set it (or workers > 1) to fine-tune with DeepSpeed")

    @model_validator(mode="after")
    def _deepspeed(self):
        if self.workers > 1 and self.deepspeed is None:
            self.deepspeed = DeepSpeedConfig()
        if self.deepspeed is not None:
            if self.gpu not in (0, 1):
                raise ValueError("resources.gpu: one DeepSpeed worker drives 0 or 1 GPU; ask for more workers")
            try:
                self.deepspeed.resolve_backend(self.gpu)
            except ValueError as err:
                raise ValueError(f"resources.{err}") from None
        return self

    @property
    def data_parallel(self) -> DataParallel | None:
        if self.deepspeed is None:
            return None
        return DataParallel(self.workers, self.cpu, self.gpu, self.deepspeed)


class ProbesConfig(_Strict):
    size: int = Field(default=256, ge=8, description="validation images used as CKA probes")


class TrackingConfig(_Strict):
    uri: str | None = Field(default=None, description="MLflow tracking URI; default sqlite:///mlflow.db in the working directory")
    experiment: str | None = Field(default=None, description="MLflow experiment name; default: the config's name")


STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "file")


class RayConfig(_Strict):
    address: str | None = Field(default=None, description="existing cluster (ray://... or HOST:PORT); none = the "
                                "cluster of the Ray job this runs in (RAY_ADDRESS), else an embedded local Ray")
    storage_path: str = Field(default="ray_results", description="where Ray Tune keeps trial checkpoints: a folder "
                              "(on a cluster, one every node shares) or s3://, gs://, hdfs://, abfs:// storage")
    max_failures: int = Field(default=2, ge=0, description="restarts of a trial after a failure (a lost node): it "
                              "continues from its last fine-tune epoch checkpoint")
    reuse_actors: bool = True

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        scheme = v.split("://", 1)[0] if "://" in v else None
        if scheme is not None and scheme not in STORAGE_SCHEMES:
            raise ValueError(f"unsupported storage scheme {scheme!r}:// (use a folder or one of "
                             f"{', '.join(s + '://' for s in STORAGE_SCHEMES)})")
        return v

    def storage_uri(self) -> str:
        """The storage path as Ray Tune takes it: a URI unchanged, a folder made absolute."""
        if "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path).expanduser().resolve())


class ExperimentConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    model: ModelConfig
    data: DataConfig
    parent: ParentConfig = Field(default_factory=ParentConfig)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig,
                                 description="how each candidate is pruned, and which policy hyperparameters are searched")
    objectives: list[Objective] = Field(default_factory=lambda: [
        Objective(metric="val_acc", mode="max"), Objective(metric="macs", mode="min")])
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    finetune: TrainRecipe = Field(default_factory=TrainRecipe, description="each candidate's fine-tune after pruning")
    distill: DistillConfig = Field(default_factory=DistillConfig,
                                   description="knowledge distillation from the parent during fine-tuning")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    probes: ProbesConfig = Field(default_factory=ProbesConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    early_stop: EarlySelectionConfig = Field(default_factory=EarlySelectionConfig,
                                             description="CKA early selection and multi-objective successive halving")
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig,
                                           description="hard cost bounds, checked before a candidate is trained")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    cache_dir: Path | None = Field(default=None, description="parent/data cache; default $PRUNETUNE_CACHE or ~/.cache/prunetune")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("use letters, digits, '_', '-' and '.' only")
        return v

    @model_validator(mode="after")
    def _objectives(self):
        metrics = [o.metric for o in self.objectives]
        if "latency_ms" in metrics and not self.cost.latency:
            raise ValueError("objectives: latency_ms needs cost.latency: true")
        if self.constraints.max_latency_ms is not None and not self.cost.latency:
            raise ValueError("constraints.max_latency_ms: needs cost.latency: true")
        if len(self.objectives) < 2 or len(set(metrics)) != len(metrics):
            raise ValueError("objectives: need at least two distinct metrics, e.g. val_acc/max and macs/min")
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self):
        if self.resources.deepspeed is not None:
            try:
                micro_batch_size(self.finetune.batch_size, self.resources.workers)
            except ValueError as err:
                raise ValueError(f"finetune.batch_size: {err}") from None
        return self

    @model_validator(mode="after")
    def _gradient_needs_a_vector_policy(self):
        if self.sampler.name == "gradient":
            names = self.policy.names
            if len(names) > 1 or not POLICIES[names[0]].uses_vector:
                raise ValueError(f"sampler.name: gradient moves the pruning vector; policy.name must be one policy "
                                 f"that uses it ({', '.join(n for n, c in sorted(POLICIES.items()) if c.uses_vector)}), "
                                 f"got {names}")
        return self

    @model_validator(mode="after")
    def _grid_is_discrete(self):
        if self.sampler.name != "grid":
            return self
        if len(self.policy.names) > 1:
            raise ValueError("sampler.name: grid searches one policy at a time (policy.name lists several)")
        for key in ("channel_ratio", "head_ratio"):
            r = getattr(self.space, key)
            if r.low < r.high and r.step is None:
                raise ValueError(f"space.{key}.step: the grid sampler needs a step")
        for key, dist in self.policy.distributions().items():
            try:
                grid_values(dist, key)
            except ValueError as err:
                raise ValueError(f"policy.search.{err}") from None
        return self

    @model_validator(mode="after")
    def _searchable(self, info: ValidationInfo):
        if info.context and info.context.get("trusted"):  # re-read in a trial: the driver checked it
            return self
        size = self.data.image_size or (224 if self.model.name.startswith("torchvision:") else 32)
        try:
            self.model.check_searchable(in_channels=1 if self.data.name in ("digits", "fashion-mnist") else 3,
                                        size=min(size, 64))
        except ValueError as err:
            raise ValueError(f"model.name: {err}") from None
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {loc}: {msg}" if e["loc"] else f"  {msg}")
    return "\n".join(lines)


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Relative file paths in a config are relative to the config file's folder."""
    def fix(section: dict | None, key: str):
        if isinstance(section, dict) and isinstance(section.get(key), str):
            p = Path(section[key]).expanduser()
            section[key] = str(p if p.is_absolute() else (base / p))
    fix(raw.get("data"), "root")
    fix(raw.get("parent"), "checkpoint")
    return raw


def parse_config(raw: object, *, source: str = "<config>", base: Path | None = None) -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    if base is not None:
        raw = _resolve_paths(dict(raw), base)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        n = err.error_count()
        raise ConfigError(f"{source}: {n} problem{'s' if n > 1 else ''} in the config\n{_format(err)}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(raw, source=str(path), base=path.resolve().parent)
