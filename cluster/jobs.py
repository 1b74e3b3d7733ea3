"""Ray Jobs API for prunetune: submit a search, follow its logs, list, stop.

A thin layer over `ray.job_submission.JobSubmissionClient` that sends the token of
`cluster.auth` and turns "no such job", "cannot reach the dashboard" and "token refused"
into `JobsError` (bad input for the CLI) with one clear message.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from prunetune.cluster.auth import MissingToken, auth_headers

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(ValueError):
    """Bad input for a jobs command (address, credentials, job id); `str()` is the message."""


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS when it is an http(s) URL."""
    if address:
        if not address.startswith(("http://", "https://")):
            raise JobsError(f"--address {address}: give the dashboard's URL, e.g. http://127.0.0.1:8265")
        return address.rstrip("/")
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(var, "")
        if value.startswith(("http://", "https://")):
            return value.rstrip("/")
    raise JobsError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")


def client(address: str):
    """A JobSubmissionClient for `address` with this environment's Ray token, checked to answer."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        headers = auth_headers()
    except MissingToken as err:
        raise JobsError(str(err)) from None
    try:
        with _address_from_argument():
            c = JobSubmissionClient(address, headers=headers)
        c.list_jobs()
    except ConnectionError as err:
        raise JobsError(f"cannot reach the Ray dashboard at {address}: {err}") from None
    except AuthenticationError:
        hint = ("the cluster refused this token (RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)" if headers else
                "the cluster wants a token: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=FILE")
        raise JobsError(f"{address}: {hint}") from None
    return c


@contextmanager
def _address_from_argument():
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given;
    hide them while it is built so --address means what it says."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def search_entrypoint(config_name: str, *, resume: bool) -> str:
    """The job's command: `prunetune search` run by the cluster's Python."""
    return f"python -m prunetune.search.cli search {shlex.quote(config_name)}" + (" --resume" if resume else "")


def submit(c, config: Path, *, resume: bool, runtime_env: dict) -> str:
    """Submit `prunetune search CONFIG` (CONFIG's folder is the job's working_dir); the job id."""
    return c.submit_job(entrypoint=search_entrypoint(config.name, resume=resume), runtime_env=runtime_env,
                        metadata={"prunetune.config": config.name})


def info(c, job_id: str):
    """JobDetails of `job_id`; JobsError naming it when the cluster has no such job."""
    try:
        return c.get_job_info(job_id)
    except RuntimeError as err:
        if "status code 404" in str(err) or "does not exist" in str(err):
            raise JobsError(f"no job {job_id!r} on this cluster (see: prunetune jobs list)") from None
        raise


def follow(c, job_id: str, write: Callable[[str], object]) -> str:
    """Write the job's logs as they come until it ends; returns its final status."""

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except RuntimeError:
        pass  # connection closed early (e.g. the head went away): the status says what happened
    return wait(c, job_id, timeout_s=30)


def wait(c, job_id: str, *, timeout_s: float) -> str:
    """Poll until the job is terminal or `timeout_s` passes; its status then."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def logs(c, job_id: str) -> str:
    info(c, job_id)
    return c.get_job_logs(job_id)


def stop(c, job_id: str) -> bool:
    """Ask the job to stop; False when it had already ended."""
    info(c, job_id)
    return bool(c.stop_job(job_id))


def list_jobs(c) -> list:
    """All jobs, newest first."""
    return sorted(c.list_jobs(), key=lambda j: j.start_time or 0, reverse=True)
