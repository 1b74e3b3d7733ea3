"""Terminal progress for a search: counts of trials and the best front so far.

A Ray Tune callback (driver side) that prints one line per event that matters, instead of
Ray's raw status tables. It also keeps the latest result of every trial, which the runner
uses as the trial records for the Pareto front.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ray.tune import Callback
from rich.console import Console

from prunetune.search.pareto import Objective, pareto_front


def _fmt_point(rec: dict, objectives: Sequence[Objective]) -> str:
    parts = []
    for o in objectives:
        v = rec.get(o.metric)
        if v is None:
            continue
        parts.append(f"{v / 1e6:.2f}M {o.metric.upper()}" if o.metric in ("macs", "params")
                     else f"{o.metric} {v:.3f}")
    return " @ ".join(parts)


class SearchProgress(Callback):
    def __init__(self, objectives: Sequence[Objective], total: int, console: Console | None = None):
        self.objectives = list(objectives)
        self.total = total
        self.console = console or Console()
        self.records: dict[str, dict] = {}
        self.started: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.t0 = time.monotonic()

    def __getstate__(self):
        # Ray Tune pickles its callbacks with the experiment state; a Console holds a lock.
        state = dict(self.__dict__)
        state["console"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.console = Console()

    def _counts(self) -> str:
        states = [r.get("status") for r in self.records.values()]
        parts = [f"{states.count('finished')}/{self.total} done", f"{states.count('running')} running"]
        parts += [f"{states.count(s)} {s}" for s in ("infeasible", "stopped", "error") if states.count(s)]
        return ", ".join(parts)

    def _front(self) -> str:
        done = [r for r in self.records.values() if r.get("status") == "finished"]
        idx = pareto_front(done, self.objectives)
        return "; ".join(_fmt_point(done[i], self.objectives) for i in idx[:5]) or "-"

    def _line(self, msg: str) -> None:
        elapsed = time.monotonic() - self.t0
        self.console.print(f"[dim]{elapsed:5.0f}s[/] {msg}", highlight=False, soft_wrap=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()
        self.records[trial.trial_id] = {"trial_id": trial.trial_id, "status": "running", **trial.config}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rec = self.records.setdefault(trial.trial_id, {"trial_id": trial.trial_id, **trial.config})
        rec.update({k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None})
        rec["status"] = "running"
        if result.get("epoch") == 0:
            self._line(f"  {trial.trial_id} pruned to {result['macs'] / 1e6:.2f}M MACs, "
                       f"CKA {result['cka']:.3f}, val_acc {result['val_acc']:.3f} before fine-tune")

    def on_trial_complete(self, iteration, trials, trial, **info):
        rec = self.records.setdefault(trial.trial_id, {"trial_id": trial.trial_id, **trial.config})
        rec["status"] = ("finished" if rec.get("trial_complete") else
                         "infeasible" if rec.get("infeasible") else "stopped")
        self.wall[trial.trial_id] = time.monotonic() - self.started.get(trial.trial_id, self.t0)
        rec["wall_s"] = self.wall[trial.trial_id]
        self._line(f"[bold]{trial.trial_id} {rec['status']}[/]: {_fmt_point(rec, self.objectives)}  "
                   f"[dim]({self._counts()})[/]")
        self.console.print(f"        front so far: {self._front()}", highlight=False, soft_wrap=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.records.setdefault(trial.trial_id, {"trial_id": trial.trial_id, **trial.config})["status"] = "running"
        self._line(f"[yellow]{trial.trial_id} lost its worker[/]: restarting from its last checkpoint "
                   f"[dim]({self._counts()})[/]")

    def on_trial_error(self, iteration, trials, trial, **info):
        rec = self.records.setdefault(trial.trial_id, {"trial_id": trial.trial_id, **trial.config})
        rec["status"] = "error"
        rec["error_file"] = getattr(trial, "error_file", None) or ""
        self._line(f"[red]{trial.trial_id} failed[/]: see {rec['error_file'] or trial.local_path}  "
                   f"[dim]({self._counts()})[/]")
