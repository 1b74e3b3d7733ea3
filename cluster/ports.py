"""Free loopback ports for local servers, picked outside the kernel's ephemeral range.

Ports handed out by `bind(0)` come from the ephemeral range, where any outgoing connection
may take them before our server binds; picking below that range (and above Ray's default
worker ports, 10002-19999, that embedded Rays on the same machine use) avoids most races.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
LOW = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on host:port (a server's bind, with SO_REUSEADDR, would succeed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class PortPicker:
    """Hands out distinct free ports and contiguous free ranges, never the same one twice."""

    def __init__(self, host: str = LOOPBACK, *, seed: int | None = None):
        self.host = host
        self.taken: set[int] = set()
        self._rng = random.Random(seed)
        self._high = max(LOW + 1000, _ephemeral_low())

    def port(self) -> int:
        return self.range(1)[0]

    def range(self, n: int) -> list[int]:
        for _ in range(2000):
            start = self._rng.randrange(LOW, self._high - n)
            ports = list(range(start, start + n))
            if not self.taken.intersection(ports) and all(is_free(p, self.host) for p in ports):
                self.taken.update(ports)
                return ports
        raise RuntimeError(f"no {n} free consecutive ports on {self.host} in {LOW}-{self._high}")
