"""How long `prunetune launch` takes to get a search going on the local multi-node cluster.

    python benchmarks/cluster_launch.py [--config configs/quickstart.yaml] [--pip] [--full]

Starts a LocalCluster (head with 0 CPUs + 2 workers of 1 CPU) and a LocalMlflowServer under a
temp folder, runs `prunetune launch CONFIG --no-pip` (or with the pinned pip runtime env,
`--pip`) as a subprocess and records, from the moment the command starts:

- submitted: the CLI printed the job id (config validated locally, working dir uploaded);
- running: the Jobs API reports RUNNING (runtime env ready, driver started);
- first trial started: the earliest trial's MLflow run start time (on a worker node);
- first trial line: the first per-trial line ("... pruned to ...") reaches the client's log stream.

The parent is trained by the job (fresh cache) unless --cache names a warm one. Without --full
the job is stopped after the first trial line. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from prunetune.cluster import jobs
from prunetune.cluster.local import LocalCluster
from prunetune.cluster.mlflow_local import LocalMlflowServer
from prunetune.search.tracking import ROLE_TAG


def _config(src: Path, work: Path, tracking_uri: str, cache: Path) -> Path:
    cfg = yaml.safe_load(src.read_text())
    cfg["tracking"] = {"uri": tracking_uri}
    cfg["ray"] = {**cfg.get("ray", {}), "storage_path": str(work / "ray_results")}
    cfg["cache_dir"] = str(cache)
    (work / "exp").mkdir()
    out = work / "exp" / src.name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def measure(config: Path, *, pip: bool, full: bool, cache: Path | None, work: Path) -> dict:
    marks: dict[str, float] = {}
    with LocalCluster(2, state_dir=work / "state") as cluster, LocalMlflowServer(work / "mlflow") as server:
        cfg = _config(config, work, server.uri, cache or work / "cache")
        os.environ.update(cluster.env())
        os.environ.pop("RAY_ADDRESS", None)
        client = jobs.client(cluster.dashboard_url)
        cmd = [sys.executable, "-m", "prunetune.search.cli", "launch", str(cfg), "--address", cluster.dashboard_url]
        t0 = time.time()
        proc = subprocess.Popen(cmd + ([] if pip else ["--no-pip"]), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        job_id = None

        def poll_status():
            while "running" not in marks and proc.poll() is None:
                if job_id and jobs.wait(client, job_id, timeout_s=0) in ("RUNNING", "SUCCEEDED", "FAILED"):
                    marks["running"] = time.time() - t0
                time.sleep(0.2)

        watcher = threading.Thread(target=poll_status, daemon=True)
        for line in proc.stdout:
            if job_id is None and line.startswith("submitted job "):
                marks["submitted"] = time.time() - t0
                job_id = line.split()[2]
                watcher.start()
            if "first_trial_line" not in marks and " pruned to " in line:
                marks["first_trial_line"] = time.time() - t0
                if not full:
                    jobs.stop(client, job_id)
            if not full and "first_trial_line" in marks and "running" in marks:
                break
        proc.terminate()
        proc.wait(timeout=60)
        if "running" not in marks and job_id:
            watcher.join(timeout=5)
        mlf = MlflowClient(server.uri)
        exp = mlf.get_experiment_by_name(yaml.safe_load(cfg.read_text())["name"])
        trials = [r for r in mlf.search_runs([exp.experiment_id]) if r.data.tags.get(ROLE_TAG) == "trial"] if exp else []
        if trials:
            marks["first_trial_started"] = min(r.info.start_time for r in trials) / 1000 - t0
        marks["job_status"] = jobs.wait(client, job_id, timeout_s=60) if job_id else "not submitted"
    return {"config": str(config), "runtime_env": "pip (pinned)" if pip else "--no-pip",
            **{k: round(v, 1) if isinstance(v, float) else v for k, v in marks.items()},
            "cpus": os.cpu_count(), "load_1min_at_end": round(os.getloadavg()[0], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    ap.add_argument("--pip", action="store_true", help="use the default pinned pip runtime env instead of --no-pip")
    ap.add_argument("--full", action="store_true", help="let the search finish instead of stopping it after one trial")
    ap.add_argument("--cache", type=Path, default=None, help="a warm parent cache (default: a fresh one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptc-bench-") as work:
        print(json.dumps(measure(args.config, pip=args.pip, full=args.full, cache=args.cache, work=Path(work)),
                         indent=2))


if __name__ == "__main__":
    main()
