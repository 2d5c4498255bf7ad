"""`just bench-synapse --smoke` on the real worker topology: what routing guarantees.

The Synapse savings benchmark (bench/synapse_bench.py) at its smallest: 6 users × 3 devices, 4
sync workers, one short cold window per policy. Only what the routing guarantees is asserted, never
a timing: under **user** (envoy.yaml with the filter) every active user has exactly one notifier
stream across all sync workers; under **token** (MAGLEV on Authorization) and **round robin** at
least as many; and under every policy every device received every message. 18 tokens reconnect at
most 16 at a time, below the filter's `max_whoami_in_flight`, so no first request takes the
per-token fallback key (which would split a user, and the filter's counters say so).

Skipped (visible reason) when PostgreSQL or Redis is not installed (`just worker-deps`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from msrtest import workers
from msrtest.env import REPO, WASM

USERS = 6


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    try:
        workers.check_dependencies()
    except workers.MissingDependency as exc:
        pytest.skip(f"the Synapse bench needs PostgreSQL and Redis: {exc}")
    out = tmp_path_factory.mktemp("bench-synapse") / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msrbench.synapse_bench",
            "--smoke",
            "--users",
            str(USERS),
            "--wasm",
            str(WASM),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(out.read_text())
    return {w["policy"]: w for w in results["windows"]}, proc.stdout


def test_every_policy_ran_and_delivered_every_message(smoke):
    windows, _ = smoke
    assert set(windows) == {"user", "token", "round_robin"}
    for policy, w in windows.items():
        assert w["messages"] > 0 and w["expected"] > 0, (policy, w)
        assert w["missing"] == 0 and w["delivered"] == w["expected"], (policy, w)
        assert w["send_errors"] == 0 and w["sync_errors"] == 0, (policy, w)


def test_routing_by_user_keeps_one_notifier_stream_per_user(smoke):
    windows, _ = smoke
    w = windows["user"]
    assert w["notifier_users"] == USERS, w["notifier_by_worker"]
    assert w["filter"]["fallbacks"] == 0 and w["filter"]["shed"] == 0, w["filter"]
    assert w["filter"]["whoami_ok"] == USERS * 3, w["filter"]


def test_routing_by_token_or_round_robin_keeps_at_least_as_many(smoke):
    windows, _ = smoke
    for policy in ("token", "round_robin"):
        assert windows[policy]["notifier_users"] >= USERS, windows[policy]["notifier_by_worker"]


def test_every_sync_was_served_by_a_sync_worker(smoke):
    """The workers' own SyncRestServlet counts cover the devices' syncs (none went elsewhere)."""
    windows, _ = smoke
    for policy, w in windows.items():
        # Every sync the devices made was answered by a sync worker, but the long-polls still
        # waiting when the window ended (one per device).
        assert w["worker_syncs"] >= w["client_syncs"] - USERS * 3, (policy, w)
