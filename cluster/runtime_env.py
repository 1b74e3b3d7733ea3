"""The Ray runtime_env of a submitted search: its files, its Python packages, its secrets.

- working_dir: the config's folder (the config, and files it names relatively, travel with it),
  without version control, environments, local results and databases.
- pip: prunetune's direct dependencies pinned to the versions installed here (or a user's
  requirements file), so the job does not run against whatever the cluster happens to have.
  Ray itself is left out: the cluster's Ray runs the job and cannot be swapped by pip.
- env_vars: only variables named on the command line, copied from this environment (secrets
  such as MLFLOW_TRACKING_PASSWORD never live in the YAML), plus MLFLOW_TRACKING_URI if set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

EXCLUDES = [".git", ".venv", "venv", "mlruns", "mlartifacts", "ray_results", "*.db", "*.db-journal",
            ".prunetune", "__pycache__", ".pytest_cache", "checkpoints"]
ALWAYS_COPIED = ("MLFLOW_TRACKING_URI",)
NOT_PIP_INSTALLED = {"ray"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class RuntimeEnvError(ValueError):
    """Unusable launch input (missing variable or requirements file); the message names it."""


def pinned_requirements(dist: str = "prunetune") -> list[str]:
    """`name==installed version` for each direct, non-optional dependency of `dist` (no Ray)."""
    pins = []
    for req in requires(dist) or []:
        if "extra ==" in req.replace('"', "").replace("'", ""):
            continue
        m = _NAME.match(req)
        if not m or m.group(1).lower() in NOT_PIP_INSTALLED:
            continue
        try:
            pins.append(f"{m.group(1)}=={version(m.group(1))}")
        except PackageNotFoundError:
            raise RuntimeEnvError(f"{dist} needs {m.group(1)}, which is not installed here; "
                                  "pass --requirements FILE or --no-pip") from None
    return pins


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a pip requirements file (comments and blanks dropped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise RuntimeEnvError(f"--requirements {path}: {err.strerror}") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln]


def copied_env(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The named variables from `environ` (each must be set) plus MLFLOW_TRACKING_URI if set."""
    environ = os.environ if environ is None else environ
    out = {k: environ[k] for k in ALWAYS_COPIED if environ.get(k)}
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RuntimeEnvError(f"--env {name!r}: not an environment variable name")
        if name not in environ:
            raise RuntimeEnvError(f"--env {name}: not set in this environment")
        out[name] = environ[name]
    return out


def build(working_dir: Path, *, pip: list[str] | None, env_vars: Mapping[str, str]) -> dict:
    """The runtime_env dict for JobSubmissionClient.submit_job."""
    env: dict = {"working_dir": str(working_dir), "excludes": list(EXCLUDES)}
    if pip:
        env["pip"] = {"packages": list(pip), "pip_check": False}
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env
