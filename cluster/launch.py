"""Everything `prunetune launch` checks and builds before a search is submitted to a cluster.

The config is validated here, on the client, exactly as `prunetune search` would; a bad
config, an unset --env variable or an unreadable requirements file stops the launch before
anything reaches the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prunetune.cluster import runtime_env


@dataclass
class Prepared:
    config: Path
    name: str
    runtime_env: dict
    warnings: list[str] = field(default_factory=list)


def prepare(config: str | Path, *, env_names: list[str], requirements: str | None, pip: bool) -> Prepared:
    """Validate CONFIG and build the job's runtime_env. Raises ConfigError / RuntimeEnvError."""
    from prunetune.search.config import load_config

    path = Path(config).absolute()
    cfg = load_config(path)
    packages = (runtime_env.read_requirements(requirements) if requirements
                else runtime_env.pinned_requirements() if pip else None)
    env_vars = runtime_env.copied_env(env_names)
    env = runtime_env.build(path.parent, pip=packages, env_vars=env_vars)
    return Prepared(path, cfg.name, env, cluster_warnings(cfg, env_vars))


def cluster_warnings(cfg, env_vars: dict) -> list[str]:
    """Settings that work on one machine but lose results on a cluster (the job's working
    folder is a temporary copy on the head node)."""
    out = []
    uri = cfg.tracking.uri or env_vars.get("MLFLOW_TRACKING_URI")
    if not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        out.append("tracking.uri is not an MLflow server: each node would write its own local store; "
                   "set tracking.uri: http://HOST:PORT (or export MLFLOW_TRACKING_URI)")
    storage = str(cfg.ray.storage_path)
    if "://" not in storage and not Path(storage).expanduser().is_absolute():
        out.append(f"ray.storage_path {storage!r} is relative: Ray results land in the job's temporary "
                   "working folder on the head node; use an absolute path on shared storage, or s3://...")
    return out
