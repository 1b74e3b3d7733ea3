"""`prunetune cluster up|down|status`, `prunetune launch`, `prunetune jobs list|logs|stop`.

search/cli.py registers these parsers and calls `run`. Exit codes as there: 0 success,
1 the job or cluster failed, 2 bad input (config, arguments, address, token, job id), and
130 when the user stops following a job with Ctrl-C (the job keeps running).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
MLFLOW_SUBDIR = "mlflow"


def add_subcommands(sub) -> None:
    """Register `cluster`, `launch` and `jobs` on the `prunetune` subparsers."""
    from prunetune.cluster.local import DEFAULT_STATE_DIR

    c = sub.add_parser("cluster", help="a local multi-node Ray cluster on loopback (for trying a cluster search)")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    up = csub.add_parser("up", help="start a head and N worker nodes (token auth on), then return")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--cpus-per-worker", type=int, default=1, metavar="C")
    up.add_argument("--gpus-per-worker", type=int, default=0, metavar="G")
    up.add_argument("--resources", default=None, metavar="JSON", help='custom resources per worker, e.g. \'{"fast": 1}\'')
    up.add_argument("--mlflow", action="store_true", help="also start an MLflow tracking server on 127.0.0.1")
    for p in (up, csub.add_parser("down", help="stop what `cluster up` started"),
              csub.add_parser("status", help="show the nodes of the local cluster")):
        p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), metavar="D",
                       help=f"where the cluster's state, token and logs live (default {DEFAULT_STATE_DIR})")

    la = sub.add_parser("launch", help="submit a search to a Ray cluster as a Ray job and follow it")
    la.add_argument("config", help="experiment YAML; its folder is shipped as the job's working dir")
    _address_arg(la)
    la.add_argument("--resume", action="store_true", help="run `prunetune search --resume` on the cluster")
    la.add_argument("--no-follow", action="store_true", help="return after submitting instead of following the logs")
    la.add_argument("--env", action="append", default=[], metavar="NAME",
                    help="copy this environment variable into the job (repeatable; e.g. MLFLOW_TRACKING_PASSWORD)")
    pip = la.add_mutually_exclusive_group()
    pip.add_argument("--requirements", default=None, metavar="FILE", help="pip requirements for the job")
    pip.add_argument("--no-pip", action="store_true",
                     help="use the cluster's Python packages as they are (default: prunetune's dependencies pinned "
                          "to the versions installed here, in a job virtualenv)")

    j = sub.add_parser("jobs", help="Ray jobs on a cluster: list, logs, stop")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    _address_arg(jsub.add_parser("list", help="jobs, newest first"))
    lg = jsub.add_parser("logs", help="print a job's logs")
    lg.add_argument("job_id")
    lg.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    _address_arg(lg)
    st = jsub.add_parser("stop", help="stop a running job")
    st.add_argument("job_id")
    _address_arg(st)


def _address_arg(p) -> None:
    p.add_argument("--address", default=None, metavar="URL",
                   help="the cluster's dashboard, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, or $RAY_ADDRESS "
                        "if it is an http URL); token from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")


def run(args: argparse.Namespace, console: Console) -> int:
    handler = {"cluster": cmd_cluster, "launch": cmd_launch, "jobs": cmd_jobs}[args.command]
    return handler(args, console)


def _error(console: Console, msg: str, code: int = EXIT_BAD_INPUT) -> int:
    console.print(f"[red]error[/] {msg}", highlight=False)
    return code


# --- cluster -------------------------------------------------------------------------------
def cmd_cluster(args, console: Console) -> int:
    return {"up": _cluster_up, "down": _cluster_down, "status": _cluster_status}[args.cluster_command](args, console)


def _cluster_up(args, console: Console) -> int:
    from prunetune.cluster.local import BadState, ClusterError, ClusterExists, LocalCluster
    from prunetune.cluster.mlflow_local import LocalMlflowServer, MlflowServerError

    try:
        resources = _up_resources(args)
    except ValueError as err:
        return _error(console, str(err))
    cluster = LocalCluster(args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                           resources_per_worker=resources, state_dir=args.state_dir)
    console.print(f"starting a head and {args.workers} worker node(s) on 127.0.0.1 ...")
    try:
        cluster.up()
    except (ClusterExists, BadState) as err:
        return _error(console, str(err))
    except ClusterError as err:
        return _error(console, f"the cluster did not come up; everything started was stopped again\n{err}", 1)
    server = None
    if args.mlflow:
        try:
            server = LocalMlflowServer(cluster.state_dir / MLFLOW_SUBDIR).start()
        except MlflowServerError as err:
            cluster.down()
            return _error(console, f"the MLflow server did not start; the cluster was stopped again\n{err}", 1)
    env = cluster.env()
    console.print(f"[green]cluster up[/]: head + {args.workers} worker(s), {args.cpus_per_worker} CPU each", highlight=False)
    console.print(f"  dashboard / Jobs API: {cluster.dashboard_url}", highlight=False)
    console.print(f"  GCS address:          {cluster.address}", highlight=False)
    console.print(f"  token file:           {cluster.token_file}", highlight=False)
    if server:
        console.print(f"  MLflow tracking URI:  {server.uri}", highlight=False)
    console.print("point clients at it:", highlight=False)
    exports = " ".join(f"{k}={v}" for k, v in env.items())
    console.print(f"  export {exports}" + (f" MLFLOW_TRACKING_URI={server.uri}" if server else ""),
                  highlight=False, soft_wrap=True)
    console.print(f"  prunetune launch CONFIG --address {cluster.dashboard_url}", highlight=False)
    console.print(f"stop it: prunetune cluster down --state-dir {args.state_dir}", highlight=False)
    return 0


def _up_resources(args) -> dict | None:
    """The parsed --resources (None when not given); ValueError naming the first unusable flag."""
    if args.workers < 1:
        raise ValueError(f"--workers: need at least 1 worker node, got {args.workers}")
    if args.cpus_per_worker < 1:
        raise ValueError(f"--cpus-per-worker: need at least 1, got {args.cpus_per_worker}")
    if args.gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker: must not be negative, got {args.gpus_per_worker}")
    if args.resources is None:
        return None
    try:
        res = json.loads(args.resources)
    except ValueError as err:
        raise ValueError(f"--resources: not JSON ({err})") from None
    if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 and float(v).is_integer()
                                            for v in res.values()):
        raise ValueError('--resources: must be a JSON object of resource name -> whole amount, e.g. {"fast": 1}')
    taken = [k for k in res if k in ("CPU", "GPU", "memory", "object_store_memory")]
    if taken:
        raise ValueError(f"--resources: {taken[0]} is set by its own flag, not --resources")
    return res


def _cluster_down(args, console: Console) -> int:
    from prunetune.cluster.local import BadState, ClusterError, LocalCluster, NoCluster
    from prunetune.cluster.mlflow_local import LocalMlflowServer, MlflowServerError

    code, stopped = 0, []
    mlflow_root = Path(args.state_dir) / MLFLOW_SUBDIR
    try:
        LocalMlflowServer.load(mlflow_root).stop()
        stopped.append("MLflow server")
    except MlflowServerError as err:
        if "no MLflow server recorded" not in str(err):
            code = _error(console, str(err), 1)
    try:
        cluster = LocalCluster.load(args.state_dir)
    except (NoCluster, BadState) as err:
        if stopped:
            console.print(f"stopped: {', '.join(stopped)}")
            return code
        return _error(console, str(err))
    try:
        cluster.down()
    except ClusterError as err:
        return _error(console, str(err), 1)
    stopped.append(f"Ray head + {len(cluster.worker_nodes)} worker(s)" if cluster.worker_nodes else "Ray cluster")
    console.print(f"stopped: {', '.join(stopped)}")
    return code


def _cluster_status(args, console: Console) -> int:
    from prunetune.cluster.local import ClusterError, LocalCluster
    from prunetune.cluster.mlflow_local import LocalMlflowServer, MlflowServerError

    try:
        cluster = LocalCluster.load(args.state_dir)
    except ClusterError as err:
        return _error(console, str(err))
    console.print(f"dashboard {cluster.dashboard_url}  GCS {cluster.address}  token {cluster.token_file}", highlight=False)
    rows = cluster.status()
    for r in rows:
        state = "alive" if r["process_alive"] and r["ray_alive"] else "killed" if r["killed"] else (
            "process alive, not registered in Ray" if r["process_alive"] else "dead")
        res = ", ".join(f"{k} {v:g}" for k, v in r["resources"].items()) or "no CPUs (runs job drivers)"
        console.print(f"  {r['name']:<10} pid {r['pid']:<8} {state:<8} {res}", highlight=False)
    try:
        server = LocalMlflowServer.load(Path(args.state_dir) / MLFLOW_SUBDIR)
        console.print(f"MLflow {server.uri} ({'alive' if server.alive() else 'dead'})", highlight=False)
    except MlflowServerError:
        pass
    return 0 if all(r["process_alive"] and r["ray_alive"] for r in rows if not r["killed"]) else 1


# --- launch / jobs -------------------------------------------------------------------------
def cmd_launch(args, console: Console) -> int:
    from prunetune.cluster import jobs
    from prunetune.cluster.launch import prepare
    from prunetune.cluster.runtime_env import RuntimeEnvError
    from prunetune.search.config import ConfigError

    try:
        prep = prepare(args.config, env_names=args.env, requirements=args.requirements, pip=not args.no_pip)
    except ConfigError as err:
        console.print(f"[red]config error[/] {err}", highlight=False)
        return EXIT_BAD_INPUT
    except RuntimeEnvError as err:
        return _error(console, str(err))
    for w in prep.warnings:
        console.print(f"[yellow]warning[/] {w}", highlight=False)
    try:
        address = jobs.resolve_address(args.address)
        client = jobs.client(address)
    except jobs.JobsError as err:
        return _error(console, str(err))
    job_id = jobs.submit(client, prep.config, resume=args.resume, runtime_env=prep.runtime_env)
    console.print(f"submitted job {job_id} ({prep.name}) to {address}", highlight=False)
    if args.no_follow:
        console.print(f"  follow:  prunetune jobs logs {job_id} --follow --address {address}", highlight=False)
        return 0
    return _follow(client, job_id, address, console)


def _follow(client, job_id: str, address: str, console: Console) -> int:
    from prunetune.cluster import jobs

    out = console.file
    try:
        status = jobs.follow(client, job_id, lambda s: (out.write(s), out.flush()))
    except KeyboardInterrupt:
        console.print(f"\nstopped following; job {job_id} keeps running on the cluster", highlight=False)
        console.print(f"  stop it:  prunetune jobs stop {job_id} --address {address}", highlight=False)
        console.print(f"  follow:   prunetune jobs logs {job_id} --follow --address {address}", highlight=False)
        return EXIT_INTERRUPTED
    colour = "green" if status == "SUCCEEDED" else "red"
    console.print(f"job {job_id} [{colour}]{status}[/]", highlight=False)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args, console: Console) -> int:
    from prunetune.cluster import jobs

    try:
        address = jobs.resolve_address(args.address)
        client = jobs.client(address)
        if args.jobs_command == "list":
            _print_jobs(jobs.list_jobs(client), console)
            return 0
        if args.jobs_command == "logs":
            jobs.info(client, args.job_id)
            if args.follow:
                return _follow(client, args.job_id, address, console)
            console.file.write(jobs.logs(client, args.job_id))
            return 0
        if jobs.stop(client, args.job_id):
            console.print(f"stopping job {args.job_id}", highlight=False)
        else:
            console.print(f"job {args.job_id} had already ended ({jobs.info(client, args.job_id).status})",
                          highlight=False)
        return 0
    except jobs.JobsError as err:
        return _error(console, str(err))


def _print_jobs(items: list, console: Console) -> None:
    import time

    if not items:
        console.print("no jobs")
        return
    for j in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        console.print(f"{j.submission_id or j.job_id:<28} {str(j.status.value):<10} {when}  {j.entrypoint}",
                      highlight=False, soft_wrap=True)
