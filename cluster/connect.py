"""Start or join Ray for a search.

With no address, prunetune starts an embedded single-node Ray bound to loopback. Ray 2.60
swaps 127.0.0.1 for the machine's interface address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
is set *before ray is imported* (Ray's own loopback-only switch), so this module sets it and
imports ray lazily. With an address, it joins that cluster and changes nothing.
"""

from __future__ import annotations

import os

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "1"}


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> dict:
    """Initialise Ray once for this process; returns the cluster's resources."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if address is None:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    common = dict(log_to_driver=False, logging_level="WARNING", configure_logging=True)
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", **common)
    else:
        ray.init(address=address, **common)
    return ray.cluster_resources()


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
