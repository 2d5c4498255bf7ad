"""`just demo` smoke test: demo.py --once prints each user's devices on one worker."""

from __future__ import annotations

import collections
import re
import subprocess
import sys

import pytest

from msrtest.env import WASM

ROW = re.compile(r"^(@\S+)\s{2,}(\S+)\s{2,}(sync-\d+)\s{2,}(\S+)\s{2,}(\d+)$")


def test_demo_once_shows_each_users_devices_on_one_worker():
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing")
    proc = subprocess.run(
        [sys.executable, "-m", "msrtest.demo", "--once", "--wasm", str(WASM)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    rows = [m.groups() for line in proc.stdout.splitlines() if (m := ROW.match(line.strip()))]
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    workers: dict[str, set[str]] = collections.defaultdict(set)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for user, device, worker, _listener, _syncs in rows:
        workers[user].add(worker)
        devices[user].add(device)
    assert sorted(workers) == [f"@{n}:example.test" for n in ("alice", "bob", "carol", "dave")], (
        rows
    )
    for user in workers:
        assert len(devices[user]) == 2, (user, rows)
        assert len(workers[user]) == 1, f"{user}'s devices on several workers: {rows}"
    assert "SPLIT" not in proc.stdout
    assert "Authorization" not in proc.stdout, "--once must not print the curl line"
