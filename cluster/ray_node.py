"""`ray start` for nodes of a loopback-only local cluster: Ray's own command, one guard lifted.

Measured with Ray 2.60: a node whose IP is not exactly 127.0.0.1 (an alias like 127.0.0.2
included) binds its gRPC servers (GCS, raylet, object manager, workers, agents) to 0.0.0.0,
reachable from the network. Only node IP 127.0.0.1 keeps every socket on loopback, and only
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, else `ray start` rewrites 127.0.0.1 to the
interface address. With that switch set, `ray start --address ...` refuses to join a
cluster ("Multi-node Ray clusters are not supported on Windows and OSX"). This runs the
unmodified `ray start` command with that refusal lifted, and nothing else changed:

    python -m prunetune.cluster.ray_node start --address 127.0.0.1:PORT --node-ip-address 127.0.0.1 --block
"""

from __future__ import annotations

import sys
import types


def _joining_allowed() -> None:
    """Let `ray start` (and only it) see ENABLE_RAY_CLUSTER=True; address resolution elsewhere
    in Ray still sees the loopback-only setting."""
    import ray._private.ray_constants as constants
    from ray.scripts import scripts

    class _View(types.ModuleType):
        def __getattr__(self, name):
            return getattr(constants, name)

    view = _View(constants.__name__)
    view.ENABLE_RAY_CLUSTER = True
    scripts.ray_constants = view


def main() -> None:
    _joining_allowed()
    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    sys.exit(ray_main())


if __name__ == "__main__":
    main()
