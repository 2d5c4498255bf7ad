"""Soak: many users × devices syncing concurrently through Envoy to real Synapse listeners.

`just test` runs the short version (one initial and a few incremental rounds); `just soak`
(MSR_SOAK=long) keeps the load up for MSR_SOAK_SECONDS (default 180). Either way: 0 failed syncs,
each user's requests all on one worker, whoami calls = distinct tokens (+ refresh-ahead calls),
Envoy's memory flat once warm, and a second Envoy replica with the same configuration sends every
user to the same worker.
"""

from __future__ import annotations

import collections
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from msrtest.load import SyncLoad, assert_answered_in_time, record_figures, worker_per_user

LONG = os.environ.get("MSR_SOAK") == "long"
USERS = int(os.environ.get("MSR_SOAK_USERS", "200"))
DEVICES = 3
SECONDS = float(os.environ.get("MSR_SOAK_SECONDS", "180")) if LONG else 0.0
INCREMENTAL_ROUNDS = 2  # short version
LONG_POLL_MS = 500  # `timeout` of the incremental syncs: Synapse holds each open this long
THREADS = 48
LATENCY_LIMIT_S = LONG_POLL_MS / 1000 + 5.0  # generous: 2 loaded cores
# RSS may grow while Envoy warms up (connection pools, buffers, the filter's per-VM memory of
# recent users); after the first full round it must stay within this much.
RSS_SLACK_KIB = 16 * 1024
# The long run renews every token ahead of expiry at least once: each device syncs every ~6 s,
# well inside the refresh window (the last tenth of cache_ttl_s, 12 s), so no token ever
# expires into a miss. The short run is too short for any refresh (envoy.yaml's 3600 s).
# The first round is 600 new tokens from THREADS clients at once: a restart storm, which the
# filter meets by routing new tokens beyond max_whoami_in_flight (per worker thread) with the
# fallback key. This test is about stickiness, not shedding (test_coalescing covers that), so
# the budget covers every client even if all connections land on one worker thread.
OVERRIDES = {"max_whoami_in_flight": 64, **({"cache_ttl_s": 120} if LONG else {})}
COUNTERS = ["whoami_ok", "cache_misses", "fallbacks", "whoami_failed", "refreshes", "requests"]


def filter_counters(envoy) -> dict[str, float]:
    time.sleep(1.5)  # the filter adds its counts to Envoy's on its one-second tick
    prom = envoy.prometheus()
    values = {n: prom[f"matrix_sync_router_{n}"] for n in COUNTERS}
    values["whoami_calls"] = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"]
    return values


@pytest.fixture(scope="module")
def soak_envoy(e2e_stack):
    """A fresh Envoy: its counters start at 0, so whoami calls can be compared to tokens."""
    return e2e_stack.add_envoy("soak", plugin_overrides=OVERRIDES)


@pytest.fixture(scope="module")
def soak_users(e2e_stack, soak_envoy):
    """USERS users with DEVICES devices each (registered and logged in concurrently)."""
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        users = list(
            pool.map(
                lambda i: e2e_stack.user_with_devices(soak_envoy, f"soak{i}", DEVICES), range(USERS)
            )
        )
    print(f"registered {USERS} users x {DEVICES} devices in {time.monotonic() - started:.1f}s")
    return users


def test_soak(e2e_stack, soak_envoy, soak_users):
    envoy = soak_envoy
    devices = [d for devs in soak_users for d in devs]
    tokens = {d.token for d in devices}
    before = filter_counters(envoy)
    load = SyncLoad(envoy.port, devices, sync_timeout_ms=LONG_POLL_MS, client_timeout=60)
    started = time.monotonic()
    load.run_round(THREADS)  # initial syncs (no since): every token resolved once
    rss = [envoy.rss_kib()]
    if LONG:
        load.start(threads=THREADS)
        while time.monotonic() - started < SECONDS:
            time.sleep(5)
            rss.append(envoy.rss_kib())
        load.stop()
    else:
        for _ in range(INCREMENTAL_ROUNDS):
            load.run_round(THREADS)
            rss.append(envoy.rss_kib())
    elapsed = time.monotonic() - started
    outcomes = load.attach(envoy, timeout=30)
    after = filter_counters(envoy)
    delta = {k: after[k] - before[k] for k in after}

    assert_answered_in_time(outcomes, LATENCY_LIMIT_S)
    assert all(o.routing_key == o.device.user_id for o in outcomes), "a sync not routed by its user"
    placed = worker_per_user(outcomes, envoy.workers)
    split = {u: w for u, w in placed.items() if len(w) != 1}
    assert not split, f"{len(split)} users on several workers: {list(split.items())[:3]}"
    assert len(placed) == USERS
    assert delta["whoami_calls"] == len(tokens) + delta["refreshes"], delta
    assert delta["whoami_ok"] == delta["whoami_calls"], delta
    assert delta["cache_misses"] == len(tokens) and delta["fallbacks"] == 0, delta
    if LONG and elapsed > 0.9 * 120:
        assert delta["refreshes"] >= len(tokens), f"not every token was refreshed ahead: {delta}"
    assert delta["requests"] == len(outcomes), delta
    growth = max(rss[1:] or rss) - rss[0]
    assert growth <= RSS_SLACK_KIB, f"Envoy RSS grew {growth} KiB after warm-up: {rss}"

    # A second Envoy with the same configuration: every user on the same worker, no shared state.
    replica = e2e_stack.add_envoy("soak-replica")
    assert replica.cfg["static_resources"]["clusters"] == envoy.cfg["static_resources"]["clusters"]
    other = SyncLoad(replica.port, devices)
    other.run_round(THREADS)
    on_replica = worker_per_user(other.attach(replica, timeout=30), replica.workers)
    differ = {u: (placed[u], w) for u, w in on_replica.items() if w != placed[u]}
    assert not differ, (
        f"{len(differ)} users on another worker through the replica: {list(differ.items())[:3]}"
    )

    latencies = sorted(o.elapsed for o in outcomes)
    workers = collections.Counter(next(iter(w)) for w in placed.values())
    record_figures(
        "soak (long)" if LONG else "soak (CI)",
        users=USERS,
        devices=len(devices),
        syncs=len(outcomes),
        seconds=round(elapsed, 1),
        syncs_per_s=round(len(outcomes) / elapsed, 1),
        long_poll_ms=LONG_POLL_MS,
        cache_ttl_s=(OVERRIDES or {}).get("cache_ttl_s", 3600),
        threads=THREADS,
        failed=0,
        users_split=0,
        whoami_calls=delta["whoami_calls"],
        refreshes=delta["refreshes"],
        tokens=len(tokens),
        p50_s=round(statistics.median(latencies), 3),
        p99_s=round(latencies[int(0.99 * (len(latencies) - 1))], 3),
        max_s=round(latencies[-1], 3),
        rss_kib_first=rss[0],
        rss_kib_max=max(rss),
        rss_kib_last=rss[-1],
        rss_samples=len(rss),
        users_per_worker=dict(sorted(workers.items())),
        replica_agrees=len(on_replica),
    )
