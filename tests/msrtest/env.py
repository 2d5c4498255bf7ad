"""Where things are: the repository, the built filter, the e2e work folder, and free ports on
127.0.0.1 (every test service listens there)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = REPO / ".e2e"
ENVOY_YAML = REPO / "envoy.yaml"
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "matrix_sync_router.wasm"
# The filter the tests run: $MSR_WASM (set by `just e2e`), else the release build.
WASM = Path(os.environ.get("MSR_WASM", DEFAULT_WASM))
HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
