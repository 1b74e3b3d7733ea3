"""A local multi-node Ray cluster of real `ray start --block` processes, on loopback only.

One head (the GCS, the dashboard and Jobs API on http://127.0.0.1:PORT, and the job drivers;
0 CPUs by default, like a CPU-less head of a real cluster: trials run on workers) and N worker
nodes with their own CPUs/GPUs/custom resources, raylet, object store, ports and temp dir.
Token auth is on. Every node has IP 127.0.0.1: Ray 2.60 binds its gRPC servers to 0.0.0.0 for
any other node IP, loopback aliases included (see `ray_node`), so nodes are told apart by
name (`head`, `worker-0`, ...), ports and Ray node id, not by IP.

    with LocalCluster(workers=2) as c:
        print(c.dashboard_url, c.address, c.env())

State (pids, ports, dirs) is kept in STATE_DIR/cluster.json so another process
(`prunetune cluster down`) can stop what `up` started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prunetune.cluster import processes
from prunetune.cluster.auth import write_token
from prunetune.cluster.ports import LOOPBACK, PortPicker
from prunetune.cluster.processes import Leader, log_tail

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
DEFAULT_STATE_DIR = Path(".prunetune") / "cluster"
WORKER_PORTS = 48  # Ray worker processes (one port each) per node
NODE_PORTS = ("node_manager", "object_manager", "agent_http", "agent_grpc", "runtime_env_agent", "metrics_export")


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says which part."""


class ClusterExists(ClusterError):
    """A cluster recorded in the state dir is still running."""


class NoCluster(ClusterError):
    """No cluster state in the state dir."""


class BadState(ClusterError):
    """The state dir holds a cluster.json that is not ours or is damaged."""


@dataclass
class Node:
    """One `ray start` process (a session leader) and what it was given."""

    name: str
    pid: int
    started: float
    ports: dict[str, int]
    worker_ports: tuple[int, int]
    temp_dir: str
    log: str
    resources: dict[str, float] = field(default_factory=dict)
    killed: bool = False

    @property
    def leader(self) -> Leader:
        return Leader(self.pid, self.started)


class LocalCluster:
    """A head and `workers` worker nodes; `up()` starts them, `down()` stops them."""

    def __init__(self, workers: int = 2, *, cpus_per_worker: int = 1, gpus_per_worker: int = 0,
                 resources_per_worker: dict[str, float] | None = None, head_cpus: int = 0,
                 object_store_mb: int = 256, state_dir: str | Path = DEFAULT_STATE_DIR, timeout_s: float = 90):
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.resources_per_worker = resources_per_worker
        self.head_cpus = head_cpus
        self.object_store_mb = object_store_mb
        self.state_dir = Path(state_dir).absolute()
        self.timeout_s = timeout_s
        self.nodes: list[Node] = []
        self.temp_root: Path | None = None
        self.gcs_port = self.dashboard_port = 0
        self._ports: PortPicker | None = None

    # --- addresses a client needs -------------------------------------------------------
    @property
    def address(self) -> str:
        """GCS address, HOST:PORT (what `ray start --address` and `ray.init` take)."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard and Jobs API (what `prunetune launch --address` takes)."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def token_file(self) -> Path:
        return self.state_dir / TOKEN_FILE

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def env(self) -> dict[str, str]:
        """Environment a client on this machine needs to talk to the cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_API_SERVER_ADDRESS": self.dashboard_url}

    @property
    def worker_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head"]

    # --- lifecycle ------------------------------------------------------------------------
    def up(self) -> LocalCluster:
        """Start the head and the workers; return when Ray reports every node alive.
        On any failure everything started is stopped again and the error names the node."""
        self._claim_state_dir()
        try:
            self.temp_root = Path(tempfile.mkdtemp(prefix="ptc-", dir="/tmp"))
            self._ports = PortPicker()
            self.gcs_port, self.dashboard_port = self._ports.port(), self._ports.port()
            head = self._start("head", cpus=self.head_cpus, gpus=0, custom=None)
            self._wait_for_port(head, self.gcs_port, "its GCS")
            for _ in range(self.workers):
                self._start_worker()
            self.wait_alive()
            self._save()
        except BaseException:
            self._teardown(grace_s=0)
            raise
        return self

    def add_worker(self) -> Node:
        """Start one more worker node (same resources as the others); returns it once alive."""
        if self._ports is None:
            self._ports = PortPicker()
            for n in self.nodes:
                self._ports.taken.update(n.ports.values())
                self._ports.taken.update(range(n.worker_ports[0], n.worker_ports[1] + 1))
        node = self._start_worker()
        self.wait_alive()
        self._save()
        return node

    def kill_worker(self, i: int) -> Node:
        """SIGKILL every process of the `i`-th live worker (0-based) at once: the node is lost, as
        when a machine dies. Ray notices through missed heartbeats."""
        node = [n for n in self.worker_nodes if not n.killed][i]
        left = processes.kill([node.leader])
        node.killed = True
        self._save()
        if left:
            raise ClusterError(f"{node.name}: processes survived SIGKILL: {', '.join(left)}")
        return node

    def down(self) -> None:
        """Stop every process this cluster started (workers, then the head), remove its temp
        dir, token and state file. Raises ClusterError naming any process that survived."""
        left = self._teardown()
        if left:
            raise ClusterError(f"processes of the local cluster survived SIGKILL: {', '.join(left)}")

    def __enter__(self) -> LocalCluster:
        return self if self.nodes else self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # --- inspection -----------------------------------------------------------------------
    def survivors(self) -> list[str]:
        """Live processes of this cluster (pid and command); [] after a clean down()."""
        return [f"{p.pid} ({p.name()})" for p in processes.members(n.leader for n in self.nodes)]

    def ray_nodes(self) -> list[dict]:
        """Ray's own view of the nodes (state API): node_id, node_name, state, resources_total..."""
        body = self._get("/api/v0/nodes?limit=1000&detail=true")
        return body["data"]["result"]["result"]

    def node_ids(self) -> dict[str, str]:
        """Node name (`head`, `worker-0`, ...) -> Ray node id, for nodes Ray reports alive."""
        return {n["node_name"]: n["node_id"] for n in self.ray_nodes() if n["state"] == "ALIVE"}

    def status(self) -> list[dict]:
        """Per node: name, pid, whether its process and Ray consider it alive, resources."""
        try:
            ray_alive = set(self.node_ids())
        except (ClusterError, OSError, KeyError):
            ray_alive = set()
        return [{"name": n.name, "pid": n.pid, "process_alive": processes.leader_alive(n.leader),
                 "ray_alive": n.name in ray_alive, "resources": n.resources, "killed": n.killed}
                for n in self.nodes]

    def wait_alive(self, timeout_s: float | None = None) -> None:
        """Poll until Ray reports every node that was not killed ALIVE; names the first that is
        not (its process died, or it did not register in time) with the end of its log."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        expected = [n for n in self.nodes if not n.killed]
        while True:
            for n in expected:
                if not processes.leader_alive(n.leader):
                    raise ClusterError(f"{n.name}: `ray start` exited during startup\n{log_tail(n.log)}")
            try:
                alive = set(self.node_ids())
            except (ClusterError, OSError, KeyError, ValueError):
                alive = set()
            missing = [n for n in expected if n.name not in alive]
            if not missing:
                return
            if time.monotonic() > deadline:
                n = missing[0]
                raise ClusterError(f"{n.name}: not alive in Ray after {timeout_s or self.timeout_s:.0f}s "
                                   f"(pid {n.pid}, log {n.log})\n{log_tail(n.log)}")
            time.sleep(0.5)

    # --- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> LocalCluster:
        """The cluster recorded in `state_dir`/cluster.json (raises NoCluster if none)."""
        path = Path(state_dir).absolute() / STATE_FILE
        if not path.is_file():
            raise NoCluster(f"no local cluster recorded in {path.parent} ({STATE_FILE} not found)")
        try:
            s = json.loads(path.read_text())
            c = cls(len(s["nodes"]) - 1, state_dir=path.parent, **s["settings"])
            c.gcs_port, c.dashboard_port = s["gcs_port"], s["dashboard_port"]
            c.temp_root = Path(s["temp_root"])
            c.nodes = [Node(**{**n, "worker_ports": tuple(n["worker_ports"])}) for n in s["nodes"]]
        except (ValueError, KeyError, TypeError) as err:
            raise BadState(f"{path}: not a prunetune cluster state file ({err}); remove it if no cluster runs") from None
        return c

    def any_alive(self) -> bool:
        return any(processes.leader_alive(n.leader) for n in self.nodes) or bool(self.survivors())

    def _save(self) -> None:
        settings = {k: getattr(self, k) for k in ("cpus_per_worker", "gpus_per_worker", "resources_per_worker",
                                                  "head_cpus", "object_store_mb", "timeout_s")}
        doc = {"version": 1, "address": self.address, "dashboard_url": self.dashboard_url,
               "token_file": str(self.token_file), "gcs_port": self.gcs_port, "dashboard_port": self.dashboard_port,
               "temp_root": str(self.temp_root), "settings": settings, "nodes": [asdict(n) for n in self.nodes]}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(self.state_file)

    def _claim_state_dir(self) -> None:
        if self.state_file.exists():
            old = LocalCluster.load(self.state_dir)
            if old.any_alive():
                raise ClusterExists(f"a local cluster recorded in {self.state_dir} is still running "
                                    f"(dashboard {old.dashboard_url}); stop it first: "
                                    f"prunetune cluster down --state-dir {self.state_dir}")
            old._teardown()  # stale: its processes are gone; clear its files
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.token_file.unlink(missing_ok=True)
        write_token(self.token_file)

    def _teardown(self, grace_s: float = 8) -> list[str]:
        # all nodes at once: a local cluster has nothing to drain, and a worker whose head is
        # already gone waits ~30 s for it before shutting down
        leaders = [n.leader for n in self.nodes]
        left = processes.stop(leaders, grace_s=grace_s) if grace_s else processes.kill(leaders)
        if not left:
            if self.temp_root is not None:
                shutil.rmtree(self.temp_root, ignore_errors=True)
            self.state_file.unlink(missing_ok=True)
            self.token_file.unlink(missing_ok=True)
            self.nodes = []
        return left

    # --- starting nodes -------------------------------------------------------------------
    def _start_worker(self) -> Node:
        i = len(self.worker_nodes)
        return self._start(f"worker-{i}", cpus=self.cpus_per_worker, gpus=self.gpus_per_worker,
                           custom=self.resources_per_worker)

    def _start(self, name: str, *, cpus: int, gpus: int, custom: dict | None) -> Node:
        assert self._ports is not None and self.temp_root is not None
        ports = {k: self._ports.port() for k in NODE_PORTS}
        wp = self._ports.range(WORKER_PORTS)
        tdir = self.temp_root / ("n0" if name == "head" else f"n{len(self.nodes)}")
        log = self.state_dir / "logs" / f"{name}.log"
        log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "prunetune.cluster.ray_node", "start", "--block", "--disable-usage-stats",
               "--node-ip-address", LOOPBACK, "--node-name", name, "--temp-dir", str(tdir),
               "--num-cpus", str(int(cpus)), "--num-gpus", str(int(gpus)),
               "--object-store-memory", str(self.object_store_mb * 1024 * 1024),
               "--node-manager-port", str(ports["node_manager"]), "--object-manager-port", str(ports["object_manager"]),
               "--dashboard-agent-listen-port", str(ports["agent_http"]),
               "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
               "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
               "--metrics-export-port", str(ports["metrics_export"]),
               "--min-worker-port", str(wp[0]), "--max-worker-port", str(wp[-1])]
        if custom:
            cmd += ["--resources", json.dumps(custom)]
        env = self._node_env()
        if name == "head":
            extra = {k: self._ports.port() for k in ("client_server", "dashboard_metrics", "autoscaler_metrics")}
            ports.update(extra)
            cmd += ["--head", "--port", str(self.gcs_port), "--include-dashboard", "true",
                    "--dashboard-host", LOOPBACK, "--dashboard-port", str(self.dashboard_port),
                    "--ray-client-server-port", str(extra["client_server"])]
            # fixed defaults (44227, 44217) would collide with any other Ray on this machine
            env.update(DASHBOARD_METRIC_PORT=str(extra["dashboard_metrics"]),
                       AUTOSCALER_METRIC_PORT=str(extra["autoscaler_metrics"]))
        else:
            cmd += ["--address", self.address]
        resources = {"CPU": cpus, "GPU": gpus, **(custom or {})}
        leader = processes.spawn(cmd, env=env, log=log)
        node = Node(name, leader.pid, leader.started, ports, (wp[0], wp[-1]), str(tdir), str(log),
                    {k: v for k, v in resources.items() if v})
        self.nodes.append(node)
        self._save()  # recorded at once: `cluster down` can clean up even if this process dies now
        return node

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_USAGE_STATS_ENABLED="0",
                   # job drivers run `python -m prunetune...`: this Python, even if its venv is not active
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
        return env

    def _wait_for_port(self, node: Node, port: int, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not processes.leader_alive(node.leader):
                raise ClusterError(f"{node.name}: `ray start` exited during startup\n{log_tail(node.log)}")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.2)
        raise ClusterError(f"{node.name}: {what} did not open port {port} in {self.timeout_s:.0f}s\n{log_tail(node.log)}")

    def _get(self, path: str) -> dict:
        token = self.token_file.read_text().strip()
        req = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            raise ClusterError(f"dashboard {self.dashboard_url}{path}: HTTP {err.code}") from None
