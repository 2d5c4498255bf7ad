"""One whoami call per token per Envoy process, and a bounded number of calls in flight, in the
real Envoy (two worker threads, so two Wasm VMs) in front of the real Synapse.

The burst test uses real tokens and Synapse's own whoami. The restart-storm test needs to see how
many whoami calls are open at one instant and to make each last a known time, which Synapse does
not show; there a small whoami stand-in on 127.0.0.1 (`SlowWhoami`) answers after a fixed delay
and records the peak number of concurrent calls, while the sync workers stay real Synapse.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from msrtest.env import HOST
from msrtest.envoy import Envoy
from msrtest.faults import SlowWhoami
from msrtest.httpclient import Response

WHOAMI_CALLS = "cluster.synapse_whoami.upstream_rq_total"


def worker_connections(envoy: Envoy) -> list[int]:
    """Downstream connections each Envoy worker thread (= Wasm VM) accepted on the listener."""
    stats = envoy.stats()
    prefix = f"listener.{HOST}_{envoy.port}.worker_"
    return [
        v
        for k, v in sorted(stats.items())
        if k.startswith(prefix) and k.endswith(".downstream_cx_total")
    ]


def burst(envoy: Envoy, token: str, n: int) -> list[Response]:
    """n concurrent first requests of one token, each on its own connection."""
    start = threading.Barrier(n)

    def one(_):
        start.wait()
        return envoy.sync(token)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def test_a_burst_of_one_new_token_makes_exactly_one_whoami_call(envoy, make_user):
    """50 concurrent first requests of a new token, spread over both worker threads: one whoami
    call for the whole process, and every request routed to the user's one worker."""
    before_cx = worker_connections(envoy)
    for user in [make_user("burst", n_devices=1) for _ in range(4)]:
        token = user.devices[0].token
        calls = envoy.stats()[WHOAMI_CALLS]
        responses = burst(envoy, token, 50)
        assert [r.status for r in responses] == [200] * 50
        assert envoy.stats()[WHOAMI_CALLS] - calls == 1, user.user_id
        workers = {envoy.worker_of(r) for r in responses}
        assert len(workers) == 1, f"{user.user_id} split over {workers}"
        # And later requests are cache hits on the same worker.
        assert envoy.worker_of(envoy.sync(token)) in workers
        assert envoy.stats()[WHOAMI_CALLS] - calls == 1
    accepted = [a - b for a, b in zip(worker_connections(envoy), before_cx, strict=True)]
    assert len(accepted) == 2 and all(n > 0 for n in accepted), (
        f"both worker threads must have taken part (cross-VM waiting): {accepted}"
    )


@pytest.fixture
def storm_envoy(e2e_stack, request):
    with SlowWhoami(delay_s=0.4) as whoami:
        envoy = e2e_stack.add_envoy(
            f"storm-{request.node.name[-12:]}",
            whoami_port=whoami.port,
            plugin_overrides={"max_whoami_in_flight": 4, "whoami_timeout_ms": 2000},
        )
        try:
            yield envoy, whoami
        finally:
            envoy.stop()


def test_a_restart_storm_never_has_more_calls_in_flight_than_configured(storm_envoy):
    """300 distinct new tokens at once through a proxy with an empty cache: at most
    max_whoami_in_flight calls per worker thread are open at any moment, the excess waits for a
    free call slot and, since this whoami is slow, most of it takes the fallback key at the
    callout timeout; every request is answered within the callout timeout (plus a tick)."""
    envoy, whoami = storm_envoy
    limit = 4 * 2  # max_whoami_in_flight × Envoy worker threads
    timeout_s = 2.0

    def one(i):
        started = time.monotonic()
        r = envoy.sync(f"storm{i:03d}tok")  # not Synapse's tokens: the worker answers 401
        return r.status, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(300)))
    statuses = {s for s, _ in results}
    slowest = max(t for _, t in results)
    assert statuses == {401}, statuses  # every request reached a worker and got its answer
    assert whoami.peak <= limit, f"{whoami.peak} whoami calls were open at once"
    assert whoami.peak >= 2, "the storm should have filled the budget"
    assert whoami.calls < 300, "the excess must not call whoami"
    assert slowest <= timeout_s + 1.5, f"a request waited {slowest:.2f} s"
    # Every request either called whoami or was shed (or joined a call). The filter flushes its
    # counters on each VM's one-second tick, and a call Envoy gave up on can still reach the slow
    # whoami after that, so the sum is read until it adds up (a request counted nowhere fails).
    deadline = time.monotonic() + 10
    while True:
        time.sleep(1.5)
        prom = envoy.prometheus()
        shed, coalesced = prom["matrix_sync_router_shed"], prom["matrix_sync_router_coalesced"]
        if shed + coalesced + whoami.calls >= 300 or time.monotonic() > deadline:
            break
    assert shed > 0
    assert shed + coalesced + whoami.calls >= 300, (shed, coalesced, whoami.calls)


def test_a_cold_start_keeps_every_user_on_one_worker(e2e_stack, make_user, request):
    """Issue 18: a freshly started Envoy (two worker threads, so two Wasm VMs, each capped at
    4 whoami calls) meets 240 new tokens at once (80 users x 3 devices). The requests beyond the
    cap wait for a free call slot instead of taking their token's fallback key, so every user's
    devices land on one worker; whoami (the real Synapse) is asked once per token at most."""
    users = [make_user("cold", n_devices=3) for _ in range(80)]
    envoy = e2e_stack.add_envoy(
        f"cold-{request.node.name[-8:]}",
        plugin_overrides={"max_whoami_in_flight": 4, "whoami_timeout_ms": 10000},
    )
    try:
        jobs = [(u, d.token) for u in users for d in u.devices]
        start = threading.Barrier(len(jobs))

        def one(job):
            start.wait()
            return job[0].user_id, envoy.sync(job[1])

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(one, jobs))
        assert [r.status for _, r in results] == [200] * len(jobs)
        workers: dict[str, set[str]] = {}
        for user_id, response in results:
            workers.setdefault(user_id, set()).add(envoy.worker_of(response))
        split = {u: w for u, w in workers.items() if len(w) > 1}
        assert not split, f"users split over workers: {split}"
        time.sleep(1.5)  # the filter flushes its counters on its one-second tick
        prom = envoy.prometheus()
        assert prom["matrix_sync_router_queued"] > 0, "the cap was never reached"
        assert prom.get("matrix_sync_router_shed", 0) == 0
        assert prom.get("matrix_sync_router_fallbacks", 0) == 0
        assert envoy.stats()[WHOAMI_CALLS] <= len(jobs)
    finally:
        envoy.stop()
