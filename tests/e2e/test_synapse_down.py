"""Synapse killed (SIGKILL) and frozen (SIGSTOP) in the middle of a load run.

One Synapse process plays main, whoami and the sync workers here, so while it is down syncs
cannot succeed: Envoy's own 503 (upstream connect failure / reset) is the right answer then, and
is Synapse's fault, not the filter's. What the filter must guarantee: it never holds a request
beyond its callout timeout (a request is always routed, even when nobody answers it), Envoy
keeps running, users it knows keep their worker while whoami is down, and new tokens are routed
by their user within one back-off once Synapse is back.
"""

from __future__ import annotations

import signal
import time

import pytest

from msrtest.env import WASM
from msrtest.envoy import Envoy
from msrtest.load import (
    FALLBACK_KEY,
    SyncLoad,
    assert_answered_in_time,
    is_upstream_failure,
    place_users,
    record_figures,
    user_routing_back,
)
from msrtest.matrix import Device
from msrtest.stack import Stack

TIMEOUT_S = 1.0
BACKOFF_S = 2
OVERRIDES = {"whoami_timeout_ms": int(TIMEOUT_S * 1000), "failure_backoff_s": BACKOFF_S}
MARGIN_S = 1.5
RECOVERY_SLACK_S = 3.0
OUTAGE_S = 4.0
# envoy.yaml's health check (every 5 s, 3 failures) cannot take a worker out of the ring sooner
# than 10 s after Synapse died; until then a cached user must be on its own worker. (A slow
# restart on a loaded box may last longer; later requests are then only checked for their key.)
HEALTH_GRACE_S = 9.0


class Account:
    """A user of this module's own Synapse."""

    def __init__(self, devices: list[Device]):
        self.devices = devices
        self.user_id = devices[0].user_id


@pytest.fixture(scope="module")
def down_stack(request):
    """A Synapse of its own (this module kills it) with one Envoy in front."""
    s = Stack(WASM, n_workers=3, prefix="down-").start()
    envoy = s.add_envoy("down", plugin_overrides=OVERRIDES)
    yield s, envoy
    s.close(keep_dir=request.session.testsfailed > 0)


def accounts(s: Stack, envoy: Envoy, prefix: str, n: int) -> list[Account]:
    return [Account(s.user_with_devices(envoy, f"{prefix}{i}", 3)) for i in range(n)]


@pytest.fixture(scope="module")
def warm(down_stack):
    """Users synced (and so cached) before any fault: (accounts, {user ID: worker})."""
    s, envoy = down_stack
    users = accounts(s, envoy, "warm", 5)
    return users, place_users(envoy, users)


def check_outage(envoy, outcomes, worker_of_user, down: float, up: float, cold_ids: set[str]):
    """The assertions shared by both faults; returns (requests in the outage, 503s)."""
    envoy.process.check_alive()
    assert envoy.admin("/ready").status == 200
    in_outage = [o for o in outcomes if down <= o.started <= up]
    outside = [o for o in outcomes if o.started < down - 0.5 or o.started > up + 1.0]
    # Before the fault and once Synapse answers /health again, every sync succeeds.
    assert_answered_in_time(outside, TIMEOUT_S + MARGIN_S)
    # During it, a failure is Envoy's report of the dead upstream, never the filter's doing.
    failed = [o for o in in_outage if o.status != 200]
    assert all(is_upstream_failure(o) for o in failed), [(o.status, o.entry) for o in failed][:5]
    # Every request was routed: known users by their user ID to their worker, new tokens by a
    # fallback key.
    for o in in_outage:
        assert o.entry is not None, f"{o.user_agent} never reached Envoy's access log"
        if o.device.user_id in cold_ids:
            assert FALLBACK_KEY.match(o.routing_key or "") or o.routing_key == o.device.user_id, (
                o.entry
            )
        else:
            assert o.routing_key == o.device.user_id, o.entry
            if o.upstream_host is not None and o.started < down + HEALTH_GRACE_S:
                assert envoy.workers[o.upstream_host] == worker_of_user[o.device.user_id], o.entry
    return in_outage, failed


def recovery(envoy, loads: list[SyncLoad], cold: list[Account], up: float) -> float:
    """Keep the load running for one back-off plus slack after Synapse is back, stop it, and
    return how long after `up` every new token was routed by its user (asserted in time)."""
    limit = BACKOFF_S + RECOVERY_SLACK_S
    time.sleep(limit + 1.0)
    outcomes = [o for load in loads for o in load.stop()]
    for load in loads:
        load.attach(envoy)
    took = user_routing_back(outcomes, [d for a in cold for d in a.devices], up)
    assert took is not None, "new tokens not routed by their user after Synapse came back"
    assert took <= limit, f"user routing came back {took:.1f}s after recovery (limit {limit}s)"
    return took


def test_synapse_sigkill_and_restart_under_load(down_stack, warm):
    s, envoy = down_stack
    users, worker_of_user = warm
    cold = accounts(s, envoy, "killcold", 2)  # first seen while Synapse is dead
    warm_load = SyncLoad(envoy.port, [d for u in users for d in u.devices], client_timeout=15)
    cold_load = SyncLoad(envoy.port, [d for a in cold for d in a.devices], client_timeout=15)
    warm_load.start(threads=3, pause=0.02)
    time.sleep(1.0)

    down = time.monotonic()
    s.synapse.send_signal(signal.SIGKILL)
    cold_load.start(threads=2, pause=0.02)
    time.sleep(OUTAGE_S)
    s.synapse.relaunch()
    up = time.monotonic()
    took = recovery(envoy, [warm_load, cold_load], cold, up)
    outcomes = warm_load.outcomes + cold_load.outcomes

    cold_ids = {a.user_id for a in cold}
    in_outage, failed = check_outage(envoy, outcomes, worker_of_user, down, up, cold_ids)
    assert failed, "Synapse was dead: some syncs should have failed (is the test broken?)"
    slowest = max(o.elapsed for o in in_outage)
    assert slowest <= TIMEOUT_S + MARGIN_S, (
        f"a request waited {slowest:.1f}s while Synapse was dead"
    )
    record_figures(
        "Synapse SIGKILL + restart",
        syncs=len(outcomes),
        during_outage=len(in_outage),
        envoy_503_during_outage=len(failed),
        max_latency_during_outage_s=round(slowest, 3),
        outage_s=round(up - down, 1),
        user_routing_back_after_s=round(took, 2),
    )


def test_synapse_sigstop_and_continue_under_load(down_stack, warm):
    """A frozen Synapse accepts connections and never answers: whoami times out after
    whoami_timeout_ms and the request is routed (fallback key) to its worker, which hangs too;
    the client gives up. Envoy's log shows each such request was routed, i.e. the filter let
    it go."""
    s, envoy = down_stack
    users, worker_of_user = warm
    cold = accounts(s, envoy, "stopcold", 2)
    client_timeout = TIMEOUT_S + MARGIN_S + 1.0
    warm_load = SyncLoad(
        envoy.port, [d for u in users for d in u.devices], client_timeout=client_timeout
    )
    cold_load = SyncLoad(
        envoy.port, [d for a in cold for d in a.devices], client_timeout=client_timeout
    )
    warm_load.start(threads=3, pause=0.02)
    time.sleep(1.0)

    down = time.monotonic()
    s.synapse.send_signal(signal.SIGSTOP)
    try:
        cold_load.start(threads=2, pause=0.02)
        time.sleep(OUTAGE_S)
    finally:
        s.synapse.send_signal(signal.SIGCONT)
    up = time.monotonic()
    took = recovery(envoy, [warm_load, cold_load], cold, up)
    outcomes = warm_load.outcomes + cold_load.outcomes

    cold_ids = {a.user_id for a in cold}
    # Requests the client gave up on (status None) are the frozen worker's; check_outage
    # still requires each to have been routed.
    hung = [o for o in outcomes if o.status is None]
    answered = [o for o in outcomes if o.status is not None]
    in_outage, _ = check_outage(envoy, answered, worker_of_user, down, up, cold_ids)
    assert hung, "Synapse was frozen: some syncs should have hung (is the test broken?)"
    for o in hung:
        assert down - 0.5 <= o.started <= up, f"a sync hung outside the freeze: {o.entry}"
        assert o.entry is not None and o.upstream_host in envoy.workers, (
            f"the filter still held a request after {o.elapsed:.1f}s: {o.entry}"
        )
        if o.device.user_id in cold_ids:
            assert FALLBACK_KEY.match(o.routing_key or ""), o.entry
        else:
            assert o.routing_key == o.device.user_id, o.entry
            assert envoy.workers[o.upstream_host] == worker_of_user[o.device.user_id]
    cold_hung = [o for o in hung if o.device.user_id in cold_ids]
    assert cold_hung, "no new token was tried while Synapse was frozen"
    record_figures(
        "Synapse SIGSTOP + SIGCONT",
        syncs=len(outcomes),
        given_up_by_client_after_s=client_timeout,
        hung_all_routed=len(hung),
        new_token_hung_routed_by_fallback=len(cold_hung),
        answered_during_freeze=len(in_outage),
        user_routing_back_after_s=round(took, 2),
    )
