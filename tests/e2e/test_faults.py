"""whoami faults under load: real Envoy, real Synapse sync workers, a fault-injecting whoami.

The Envoy here sends its whoami callouts to msrtest.faults.FaultWhoami; the sync workers are the
real Synapse listeners, so every sync must come back 200 from Synapse whatever whoami does. For
each fault, while load runs: users cached before the fault keep their worker, new tokens are
routed with their fallback key, no request waits longer than the callout timeout plus a margin;
after whoami recovers, the new tokens are routed by their user within one back-off (or
negative TTL).
"""

from __future__ import annotations

import math
import time

import pytest

from msrtest.faults import FaultWhoami
from msrtest.load import (
    FALLBACK_KEY,
    SyncLoad,
    assert_answered_in_time,
    place_users,
    record_figures,
)

TIMEOUT_S = 1.0
BACKOFF_S = 2
NEGATIVE_TTL_S = 2
OVERRIDES = {
    "whoami_timeout_ms": int(TIMEOUT_S * 1000),
    "failure_backoff_s": BACKOFF_S,
    "negative_ttl_s": NEGATIVE_TTL_S,
}
# Generous: a loaded 2-core CI box runs Synapse, Envoy and this test's threads.
MARGIN_S = 1.5
FAULT_S = 3.0  # how long each fault lasts under load
RECOVERY_SLACK_S = 3.0
FAULTS = [m for m in FaultWhoami.MODES if m not in ("proxy", "synthetic")]


@pytest.fixture(scope="module")
def fault_server(e2e_stack):
    server = FaultWhoami(
        e2e_stack.synapse.main_port, slow_under_s=0.4 * TIMEOUT_S, slow_over_s=1.8 * TIMEOUT_S
    ).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def fault_envoy(e2e_stack, fault_server):
    return e2e_stack.add_envoy("faults", whoami_port=fault_server.port, plugin_overrides=OVERRIDES)


@pytest.fixture(scope="module")
def warm_users(fault_envoy, make_user):
    """Users whose tokens are cached (whoami healthy) before any fault: {user ID: worker}."""
    users = [make_user("warm") for _ in range(4)]
    return users, place_users(fault_envoy, users)


@pytest.mark.parametrize("mode", FAULTS)
def test_whoami_fault_under_load(mode, fault_server, fault_envoy, warm_users, make_user, envoy):
    users, worker_of_user = warm_users
    cold = make_user("cold")  # its tokens are first seen during the fault
    warm_devices = [d for u in users for d in u.devices]
    load = SyncLoad(fault_envoy.port, warm_devices + cold.devices, client_timeout=30)

    fault_server.mode = mode
    load.start(threads=4)
    time.sleep(FAULT_S)
    outcomes = load.stop()
    fault_server.mode = "proxy"
    recovered = time.monotonic()
    load.attach(fault_envoy)
    fault_envoy.process.check_alive()

    # Every sync answered by the real worker in time: whoami's fault never fails a request.
    assert_answered_in_time(outcomes, TIMEOUT_S + MARGIN_S)
    assert all(o.entry["details"] == "via_upstream" for o in outcomes)
    # Cached users keep their worker and their user key.
    for o in outcomes:
        if o.device.user_id != cold.user_id:
            assert o.routing_key == o.device.user_id, (mode, o.entry)
            assert fault_envoy.workers[o.upstream_host] == worker_of_user[o.device.user_id]
    # New tokens: routed by the user only if whoami's answer was good (slow, but in time), else
    # by one fallback key per token.
    keys: dict[str, set[str]] = {}
    for o in outcomes:
        if o.device.user_id == cold.user_id:
            keys.setdefault(o.device.device_id, set()).add(o.routing_key)
    assert len(keys) == len(cold.devices), f"not every new device synced: {keys}"
    for device_id, seen in keys.items():
        if mode == "slow_under":
            assert seen == {cold.user_id}, (device_id, seen)
        else:
            assert len(seen) == 1 and FALLBACK_KEY.match(seen.pop()), (mode, device_id, keys)
    assert all("injected" not in str(o.entry) for o in outcomes)
    # One whoami per new token, and a failing token is asked again only after each back-off
    # (or negative TTL), however many syncs it makes meanwhile.
    calls = fault_server.calls_in(mode)
    cold_syncs = sum(o.device.user_id == cold.user_id for o in outcomes)
    retries = 1 if mode == "slow_under" else 1 + math.ceil(FAULT_S / min(BACKOFF_S, NEGATIVE_TTL_S))
    assert len(cold.devices) <= calls <= len(cold.devices) * retries, (mode, calls, cold_syncs)

    # Recovery: every new token is routed by its user within one back-off / negative TTL.
    limit = max(BACKOFF_S, NEGATIVE_TTL_S) + RECOVERY_SLACK_S
    pending = {d.device_id: d for d in cold.devices}
    while pending and time.monotonic() - recovered < limit + 5:
        for d in list(pending.values()):
            o = load.logged(load.sync_once(d), fault_envoy)
            assert o.status == 200, o.error
            if o.routing_key == cold.user_id:
                pending.pop(d.device_id)
        time.sleep(0.1)
    took = time.monotonic() - recovered
    assert not pending, f"{mode}: not routed by user {limit + 5:.0f}s after recovery"
    assert took <= limit, f"{mode}: user routing came back after {took:.1f}s (limit {limit:.0f}s)"
    # ... to the same worker as any other Envoy with this configuration sends that user.
    routed = [o for o in load.attach(fault_envoy) if o.routing_key == cold.user_id]
    workers = {fault_envoy.workers[o.upstream_host] for o in routed}
    r = envoy.sync(cold.devices[0].token)
    assert workers == {envoy.worker_of(r)}, workers
    record_figures(
        f"whoami fault {mode}",
        syncs=len(outcomes),
        new_token_syncs=cold_syncs,
        max_latency_s=round(max(o.elapsed for o in outcomes), 3),
        whoami_calls=calls,
        user_routing_back_after_s=round(took, 2),
    )
