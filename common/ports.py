"""Free TCP ports for the local servers fedmq starts (dev broker, test suite, benches).

A port the OS hands out for ``bind(0)`` comes from the ephemeral range, the same range it takes the
local ports of outgoing connections from. A server that is given such a port and started a moment
later (or restarted on it, as a broker is in the fault tests) can find it taken by a client's
connection, or by a client connecting to it while it is down (a loopback connect to a port in the
ephemeral range with no listener can connect to itself). RabbitMQ then exits at boot
(``dist_port_already_used``). Ports below the ephemeral range are never given to clients, so
:func:`free_port` picks one there.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10000  # below are the well-known and registered services a developer machine may run
_TRIES = 200


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for local ports of outgoing connections (Linux's default elsewhere)."""
    try:
        low, high = (int(v) for v in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))  # every address, no SO_REUSEADDR: a TIME_WAIT socket counts as taken
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port outside the ephemeral range that was free on every address a moment ago."""
    low, high = ephemeral_range()
    spans = [(lo, hi) for lo, hi in ((_LOWEST, low - 1), (high + 1, 65535)) if hi - lo >= 1000]
    if spans:
        for _ in range(_TRIES):
            lo, hi = random.choice(spans)
            port = random.randint(lo, hi)
            if _is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room outside: let the OS pick
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
