"""The Pareto front kept live in MLflow while a search runs (MLflow has no Pareto view).

A driver-side Ray Tune callback: each time a trial ends (finished, stopped or failed) it
recomputes the front from the progress records and, on the search's parent run, logs
`hypervolume` (step = trials finished; its timestamps give hypervolume against time),
`hypervolume_by_time` (step = seconds since the search started), `front_size`, and rewrites
the `front/` artifacts (JSON, CSV, PNG, interactive HTML). Child runs whose pareto rank
changed are re-tagged. A tracking failure is reported and the search goes on.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ray.tune import Callback
from rich.console import Console

from prunetune.search.front_report import write_front_artifacts
from prunetune.search.pareto import Objective, non_dominated_sort, objective_values
from prunetune.search.progress import SearchProgress
from prunetune.search.tracking import REASON_TAG, STATUS_TAG, TrackingTarget, log_metrics, retry

FRONT_ARTIFACTS = "front"


class LiveFront(Callback):
    def __init__(self, progress: SearchProgress, objectives: Sequence[Objective], target: TrackingTarget, *,
                 parent: Mapping[str, float], title: str, stop_reasons: Mapping[str, str] | None = None):
        self.progress = progress
        self.objectives = list(objectives)
        self.target = target
        self.parent = dict(parent)
        self.title = title
        self.stop_reasons = stop_reasons if stop_reasons is not None else {}
        self.t0 = time.monotonic()
        self.ranks: dict[str, int] = {}
        self.updates = 0
        self._client = None
        self._logged: tuple = ()      # (trial id, status) pairs of the last logged update
        self._doc: dict = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient
            self._client = MlflowClient(self.target.uri)
        return self._client

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record_stop(trial.trial_id)
        self.update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.update()

    def update(self) -> dict:
        """Recompute and log the front now; returns front.json's content (empty on failure)."""
        records = list(self.progress.records.values())
        key = tuple(sorted((str(r.get("trial_id")), str(r.get("status"))) for r in records))
        if key == self._logged and self._doc:
            return self._doc  # nothing ended since the last update
        try:
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_front_artifacts(records, self.objectives, Path(tmp), title=self.title,
                                              parent=self.parent)
                retry(lambda: self.client.log_artifacts(self.target.parent_run_id, tmp, FRONT_ARTIFACTS))
                doc = json.loads(Path(paths["json"]).read_text())
            finished = sum(r.get("status") == "finished" for r in records)
            metrics = {"front_size": len(doc["front"])}
            if doc.get("hypervolume") is not None:
                metrics["hypervolume"] = doc["hypervolume"]
            log_metrics(self.client, self.target.parent_run_id, metrics, step=finished)
            if "hypervolume" in metrics:
                log_metrics(self.client, self.target.parent_run_id,
                            {"hypervolume_by_time": metrics["hypervolume"]}, step=int(time.monotonic() - self.t0))
            self._retag(records)
            self.updates += 1
            self._logged, self._doc = key, doc
            return doc
        except Exception as err:  # noqa: BLE001 - the search must not die with its bookkeeping
            Console().print(f"[yellow]live front not updated[/]: {type(err).__name__}: {err}", highlight=False)
            return {}

    def _record_stop(self, trial_id: str) -> None:
        """A trial stopped by early selection: its MLflow run is closed as KILLED with the reason."""
        rec = self.progress.records.get(trial_id, {})
        reason = self.stop_reasons.get(trial_id)
        if rec.get("status") != "stopped" or reason is None:
            return
        rec["stop_reason"] = reason
        run_id = rec.get("mlflow_run_id")
        try:
            if run_id:
                retry(lambda: self.client.set_tag(run_id, STATUS_TAG, "early-stopped"))
                retry(lambda: self.client.set_tag(run_id, REASON_TAG, reason))
                retry(lambda: self.client.set_terminated(run_id, "KILLED"))
        except Exception as err:  # noqa: BLE001 - the search must not die with its bookkeeping
            Console().print(f"[yellow]stop reason not recorded[/]: {type(err).__name__}: {err}", highlight=False)

    def _retag(self, records: Sequence[dict]) -> None:
        finished = [r for r in records if r.get("status") == "finished"
                    and objective_values(r, self.objectives) is not None]
        ranks = non_dominated_sort([objective_values(r, self.objectives) for r in finished],
                                   [o.mode for o in self.objectives]) if finished else []
        for r, rank in zip(finished, ranks):
            run_id = r.get("mlflow_run_id")
            if not run_id or self.ranks.get(r["trial_id"]) == rank:
                continue
            retry(lambda: self.client.set_tag(run_id, "pareto_rank", str(rank)))
            retry(lambda: self.client.set_tag(run_id, "pareto_front", str(rank == 0).lower()))
            self.ranks[r["trial_id"]] = rank
