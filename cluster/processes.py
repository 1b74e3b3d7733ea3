"""Start detached server processes and stop exactly those, with everything they spawned.

Each server starts as the leader of a new session (`start_new_session=True`), so its pid is
also its session id. Ray's raylet puts every worker in a process group of its own, but they
keep the session, so "all processes of session S" finds them, even after a parent died and
they were re-parented. Ray's job supervisor starts each job driver in a new session; those
are found as descendants of the session's processes. A pid counts as ours only while its
start time is not earlier than its leader's, so a recycled pid is never signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Leader:
    """A session leader we started: its pid (= session id) and start time."""

    pid: int
    started: float


def spawn(cmd: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path | None = None) -> Leader:
    """Start `cmd` as a new session, stdout and stderr appended to `log`; returns at once."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(cmd), env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    return Leader(proc.pid, psutil.Process(proc.pid).create_time())


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pid: int) -> None:
    """Collect the exit status of a leader that is our own child (else it stays a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def leader_alive(leader: Leader) -> bool:
    _reap(leader.pid)
    try:
        p = psutil.Process(leader.pid)
        return abs(p.create_time() - leader.started) < 1 and _alive(p)
    except psutil.Error:
        return False


def members(leaders: Iterable[Leader]) -> list[psutil.Process]:
    """Every live process of the leaders' sessions, plus their descendants in other sessions."""
    leaders = list(leaders)
    if not leaders:
        return []
    since = {ld.pid: ld.started for ld in leaders}
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["create_time"]):
        try:
            sid = os.getsid(p.pid)
        except OSError:
            continue
        if sid in since and p.info["create_time"] >= since[sid] - 1 and _alive(p):
            found[p.pid] = p
    for p in list(found.values()):
        try:
            for c in p.children(recursive=True):
                if _alive(c):
                    found.setdefault(c.pid, c)
        except psutil.Error:
            pass
    return list(found.values())


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            _reap(p.pid)
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def stop(leaders: Sequence[Leader], *, grace_s: float = 10.0) -> list[str]:
    """SIGTERM each leader (it shuts its own children down), wait up to `grace_s`, then
    SIGKILL whatever of theirs is left. Returns descriptions of survivors (empty: all gone)."""
    known = {p.pid: p for p in members(leaders)}
    tops = [p for p in known.values() if p.pid in {ld.pid for ld in leaders}]
    _signal(tops, signal.SIGTERM)
    _wait_gone(tops, grace_s)
    return kill(leaders, known=known.values())


def kill(leaders: Sequence[Leader], *, known: Iterable[psutil.Process] = ()) -> list[str]:
    """SIGKILL every process of the leaders' sessions (and descendants) until none is left."""
    known = {p.pid: p for p in known}
    for _ in range(5):
        known.update({p.pid: p for p in members(leaders)})
        live = [p for p in known.values() if _alive(p)]
        if not live:
            return []
        _signal(live, signal.SIGKILL)
        _wait_gone(live, 3.0)
    left = [p for p in known.values() if _alive(p)]
    return [f"{p.pid} ({' '.join(p.cmdline()[:3])[:80]})" for p in left]


def log_tail(log: str | Path, n: int = 15) -> str:
    """The last `n` lines of a log, indented, for error messages."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return f"  (no log at {log})"
    return "\n".join("  | " + line for line in lines[-n:])
