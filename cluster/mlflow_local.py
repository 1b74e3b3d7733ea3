"""A real `mlflow server` on 127.0.0.1 for a local cluster: sqlite store, proxied artifacts.

Trials on every node log to it over HTTP (several processes writing one sqlite file directly
is what the server avoids). Its folder holds mlflow.db, artifacts/, server.log and
mlflow.json (pid, port), so another process can stop it; `restart()` keeps port and store,
for tests of a tracking server that goes away.

    with LocalMlflowServer("/tmp/mlf") as server:
        print(server.uri)
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prunetune.cluster import processes
from prunetune.cluster.ports import LOOPBACK, PortPicker, is_free
from prunetune.cluster.processes import Leader, log_tail

STATE_FILE = "mlflow.json"


class MlflowServerError(RuntimeError):
    """The server did not start, or cannot be found; the message says why."""


class LocalMlflowServer:
    """`mlflow server` bound to 127.0.0.1:`port` (a free one when None), data under `root`."""

    def __init__(self, root: str | Path, *, port: int | None = None, workers: int = 1,
                 basic_auth: bool = False, timeout_s: float = 90):
        self.root = Path(root).absolute()
        self.port = port
        self.workers = workers
        self.basic_auth = basic_auth
        self.timeout_s = timeout_s
        self.leader: Leader | None = None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def start(self) -> LocalMlflowServer:
        """Start the server and return once /health answers; on failure nothing is left running."""
        if self.basic_auth and importlib.util.find_spec("flask_wtf") is None:
            raise MlflowServerError("MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'")
        self.root.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = PortPicker().port()
        elif not is_free(self.port):
            raise MlflowServerError(f"port {self.port} on {LOOPBACK} is in use")
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(self.port),
               "--workers", str(self.workers),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts"]
        if self.basic_auth:
            cmd += ["--app-name", "basic-auth"]
        # MLflow 3 also starts ~8 job-runner processes (GenAI jobs, ~1.4 GB) prunetune never uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.leader = processes.spawn(cmd, env=env, log=self.log)
        self._save()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and everything it spawned (only those processes)."""
        if self.leader is None:
            return
        left = processes.stop([self.leader], grace_s=10)
        if left:
            raise MlflowServerError(f"MLflow server processes survived SIGKILL: {', '.join(left)}")
        self.leader = None
        (self.root / STATE_FILE).unlink(missing_ok=True)

    def restart(self) -> LocalMlflowServer:
        """Stop, then start again on the same port with the same store."""
        self.stop()
        deadline = time.monotonic() + 10
        while not is_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.start()

    def alive(self) -> bool:
        return self.leader is not None and processes.leader_alive(self.leader)

    def survivors(self) -> list:
        return processes.members([self.leader]) if self.leader else []

    def __enter__(self) -> LocalMlflowServer:
        return self if self.alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @classmethod
    def load(cls, root: str | Path) -> LocalMlflowServer:
        """The server recorded in `root`/mlflow.json (raises MlflowServerError if none)."""
        path = Path(root).absolute() / STATE_FILE
        try:
            s = json.loads(path.read_text())
            server = cls(path.parent, port=s["port"], workers=s["workers"], basic_auth=s["basic_auth"])
            server.leader = Leader(s["pid"], s["started"])
        except FileNotFoundError:
            raise MlflowServerError(f"no MLflow server recorded in {path.parent}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise MlflowServerError(f"{path}: not a prunetune MLflow state file ({err})") from None
        return server

    def _save(self) -> None:
        assert self.leader is not None
        doc = {"uri": self.uri, "port": self.port, "pid": self.leader.pid, "started": self.leader.started,
               "workers": self.workers, "basic_auth": self.basic_auth, "root": str(self.root)}
        tmp = self.root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.root / STATE_FILE)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise MlflowServerError(f"mlflow server exited during startup (log {self.log})\n{log_tail(self.log)}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise MlflowServerError(f"mlflow server on {self.uri} not ready after {self.timeout_s:.0f}s "
                                f"(log {self.log})\n{log_tail(self.log)}")
