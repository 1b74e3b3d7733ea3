"""Start or join Ray for a search.

With an address, prunetune joins that cluster and changes nothing. With none, but RAY_ADDRESS
set to a GCS address (HOST:PORT, as Ray sets it for a job's driver), it joins that cluster
(address="auto"): a search submitted with `prunetune launch` runs its trials on the cluster.
Otherwise it starts an embedded single-node Ray bound to loopback. Ray 2.60 swaps 127.0.0.1
for the machine's interface address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set
*before ray is imported* (Ray's own loopback-only switch), so this module sets it and imports
ray lazily.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "1"}


def cluster_in_env() -> bool:
    """True when RAY_ADDRESS names a running cluster's GCS (not a dashboard http:// URL)."""
    value = os.environ.get("RAY_ADDRESS", "").strip()
    return bool(value) and "://" not in value and value != "local"


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Initialise Ray once for this process; returns the cluster's resources."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if address is None and cluster_in_env():
        address = "auto"
    if address is None:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    common = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
    if address is None:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **common)
    else:
        ray.init(address=address, **common)
    return ray.cluster_resources()


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
