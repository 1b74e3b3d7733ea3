"""MLflow bookkeeping: one parent run per search, one child run per trial.

The driver creates the experiment and the parent run (for a sqlite URI that also creates
the database, once, before any trial starts: several processes creating a fresh database
at once corrupt it). Trials open their child run with an explicit parent run id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "prunetune.trial_id"
ROLE_TAG = "prunetune.role"
STATUS_TAG = "prunetune.status"     # "infeasible" for a trial stopped by a hard constraint
REASON_TAG = "prunetune.stop_reason"


def default_uri(workdir: Path | None = None) -> str:
    """MLFLOW_TRACKING_URI when set (as MLflow itself does; how cluster jobs find the server),
    else `mlflow.db` in the working folder."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env else f"sqlite:///{(workdir or Path.cwd()).resolve() / 'mlflow.db'}"


def optuna_storage_url(tracking_uri: str, override: str | None = None, *, folder: Path | None = None) -> str:
    """Where the search's Optuna study lives: beside the tracking database.

    Not inside it: MLflow and Optuna both keep their schema version in a table named
    `alembic_version`, so one database cannot hold both (Optuna refuses to open it). A sqlite
    tracking file `DIR/NAME.db` gets `DIR/NAME-optuna.db`; any other tracking URI (an MLflow
    server) gets `optuna.db` in `folder` (the search passes its cache folder, which outlives a
    Ray job's temporary working dir, so `--resume` finds it), unless `sampler.storage` names one.
    """
    if override:
        return override
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path.with_name(path.stem + '-optuna' + (path.suffix or '.db'))}"
    folder = (folder or Path.cwd()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def retry(fn: Callable[[], T], *, attempts: int = 6, delay: float = 0.5) -> T:
    """Retry a tracking call; sqlite briefly locks under concurrent writers, servers restart."""
    for i in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - MLflow raises many types for transient failures
            if i == attempts - 1:
                raise
            time.sleep(delay * 2 ** i)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class TrackingTarget:
    """Where trials log; small and picklable, shipped to every trial."""

    uri: str
    experiment_id: str
    parent_run_id: str


def start_search_run(uri: str, experiment: str, *, run_name: str, params: Mapping[str, Any],
                     tags: Mapping[str, str] | None = None) -> TrackingTarget:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags={ROLE_TAG: "search", **(tags or {})})
    log_params(client, run.info.run_id, params)
    return TrackingTarget(uri, exp_id, run.info.run_id)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        retry(lambda chunk=items[i:i + 100]: client.log_batch(run_id, params=chunk))


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], *, step: int) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if batch:
        retry(lambda: client.log_batch(run_id, metrics=batch))


class ChildRun:
    """A trial's MLflow run, nested under the search's parent run.

    `open` finds the trial's run before creating one, so a trial that Ray Tune restarts (its node
    died before its first checkpoint) keeps one run instead of leaving a stale duplicate; `reopen`
    continues the run named in a checkpoint.
    """

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, target: TrackingTarget, *, trial_id: str, run_name: str) -> ChildRun:
        client = MlflowClient(target.uri)
        found = retry(lambda: client.search_runs(
            [target.experiment_id], max_results=1,
            filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{target.parent_run_id}'"))
        if found:
            return cls.reopen(target, found[0].info.run_id)
        run = retry(lambda: client.create_run(
            target.experiment_id, run_name=run_name,
            tags={PARENT_TAG: target.parent_run_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}))
        return cls(client, run.info.run_id)

    @classmethod
    def reopen(cls, target: TrackingTarget, run_id: str) -> ChildRun:
        client = MlflowClient(target.uri)
        retry(lambda: client.update_run(run_id, status="RUNNING"))
        return cls(client, run_id)

    def params(self, params: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, params)

    def metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step=step)

    def artifacts(self, local_dir: Path, artifact_path: str) -> None:
        retry(lambda: self.client.log_artifacts(self.run_id, str(local_dir), artifact_path))

    def tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v))

    def end(self, status: str) -> None:
        retry(lambda: self.client.set_terminated(self.run_id, status))
