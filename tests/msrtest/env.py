"""Where things are: the repository, the built filter, the e2e work folder, and free ports on
127.0.0.1 (every test service listens there)."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = REPO / ".e2e"
ENVOY_YAML = REPO / "envoy.yaml"
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "matrix_sync_router.wasm"
# The filter the tests run: $MSR_WASM (set by `just e2e`), else the release build.
WASM = Path(os.environ.get("MSR_WASM", DEFAULT_WASM))
HOST = "127.0.0.1"


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections (and for bind to port 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Every port handed out by this process: a service may bind its port only some time after it was
# chosen (Envoys are started together, then waited for), so a port is never handed out twice.
_given: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen).

    Drawn at random from below the kernel's ephemeral range: a port from inside it (what
    binding port 0 gives) can be taken by any outgoing connection in the time between this
    check and the server's own bind, which made a Synapse listener fail with EADDRINUSE."""
    low, high = 10000, _ephemeral_low() - 1
    socks: list[socket.socket] = []
    try:
        for _ in range(50 * n):
            if len(socks) == n or high - low < 100 * n:
                break
            port = random.randint(low, high)
            if port in _given:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((HOST, port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # no room below the ephemeral range: the kernel's choice
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        _given.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()
