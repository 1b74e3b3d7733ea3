"""`prunetune search CONFIG --resume`: continue a search whose driver died.

What persists is what resume reads: the MLflow parent run (found by experiment and config
hash, not finished), its child runs, and the Optuna study beside the tracking database. Trials
that finished (or were stopped by a hard constraint) stay as they are and are not rerun; trials
that were running when the driver died are closed honestly (MLflow: KILLED, tagged
`interrupted`; Optuna: FAIL) and the remaining budget is sampled anew by the same study. So no
finished trial runs twice and no trial has two active child runs. Ray Tune's own experiment
restore is not used: it restores pickled callbacks and a searcher that would not see the
study's new trials, and the study and MLflow already hold the state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from prunetune.search.tracking import PARENT_TAG, ROLE_TAG, STATUS_TAG, TRIAL_TAG, TrackingTarget, retry

CONFIG_HASH_TAG = "prunetune.config_hash"


class NothingToResume(LookupError):
    """No unfinished search of this config exists; the message says what was looked for."""


def config_hash(cfg) -> str:
    """Identity of a search: everything in the config (a changed config is a different search)."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Resumed:
    target: TrackingTarget
    records: list[dict]        # finished / infeasible trials, in the progress-record format
    interrupted: list[str]     # trial ids closed as interrupted


def find_search(client: MlflowClient, cfg, uri: str) -> TrackingTarget:
    exp = client.get_experiment_by_name(cfg.experiment_name)
    if exp is None:
        raise NothingToResume(f"no MLflow experiment {cfg.experiment_name!r} at {uri}: nothing to resume")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    same = [r for r in runs if r.data.tags.get(CONFIG_HASH_TAG) == config_hash(cfg)]
    if not same:
        raise NothingToResume(f"experiment {cfg.experiment_name!r} has no search started with this config "
                              f"(config changed, or never run): nothing to resume")
    if same[0].info.status == "FINISHED":
        raise NothingToResume(f"the latest search of this config (run {same[0].info.run_id}) already finished")
    return TrackingTarget(uri, exp.experiment_id, same[0].info.run_id)


def _record(run) -> dict:
    metrics, params = run.data.metrics, run.data.params
    rec = {**params, **metrics, "trial_id": run.data.tags[TRIAL_TAG], "mlflow_run_id": run.info.run_id}
    rec["status"] = "infeasible" if run.data.tags.get(STATUS_TAG) == "infeasible" else "finished"
    return rec


def reopen(client: MlflowClient, target: TrackingTarget, study) -> Resumed:
    """Collect what finished, close what was interrupted, mark the parent run running again."""
    children = client.search_runs([target.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{target.parent_run_id}'", max_results=5000)
    done = [r for r in children if r.info.status == "FINISHED"
            and ("test_acc" in r.data.metrics or r.data.tags.get(STATUS_TAG) == "infeasible")]
    interrupted = [r for r in children if r not in done]
    for r in interrupted:
        retry(lambda r=r: client.set_tag(r.info.run_id, STATUS_TAG, "interrupted"))
        if r.info.status == "RUNNING":
            retry(lambda r=r: client.set_terminated(r.info.run_id, "KILLED"))
    import optuna

    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    retry(lambda: client.update_run(target.parent_run_id, status="RUNNING"))
    return Resumed(target, [_record(r) for r in done], [r.data.tags.get(TRIAL_TAG, "?") for r in interrupted])
