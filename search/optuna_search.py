"""Ray Tune's OptunaSearch, plus what prunetune tells Optuna beyond the objective values."""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from prunetune.search.constraints import ATTR, VIOLATION_KEY


class PrunetuneOptunaSearch(OptunaSearch):
    """Hands a trial's `constraint_violation` to Optuna (as the user attribute its samplers'
    constraints_func reads) before the trial is told, so infeasible candidates rank last, and
    tells a trial stopped before it finished as PRUNED (Ray's version would tell its last
    intermediate values as if they were final)."""

    def on_trial_complete(self, trial_id, result=None, error=False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and VIOLATION_KEY in result:
            ot_trial.set_user_attr(ATTR, [float(result[VIOLATION_KEY])])
        elif ot_trial is not None and not error and trial_id not in self._completed_trials \
                and not (result or {}).get("trial_complete"):
            # Stopped early (a scheduler): Optuna learns it was pruned, never a value it did not reach.
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return None
        return super().on_trial_complete(trial_id, result, error)
