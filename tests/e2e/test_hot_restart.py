"""Envoy hot-restarted with a new filter configuration while syncs are in flight.

Epoch 0 runs envoy.yaml with one plugin configuration; under load (long-polls of 0.5 s held open
by Synapse, so requests are in flight at every moment), a second Envoy process (epoch 1, same
base id and ports) takes the listener over with another `cache_ttl_s`; the old one drains and
exits. No sync may fail, and every user stays on its worker across the two processes (the ring
is built from the same hosts, the key is the user ID).
"""

from __future__ import annotations

import json
import time

from msrtest.envoy import HotRestartEnvoy, dicts_in
from msrtest.load import (
    SyncLoad,
    assert_answered_in_time,
    place_users,
    record_figures,
    worker_per_user,
)

LONG_POLL_MS = 500
MARGIN_S = 2.5  # the new process resolves each token once more (its cache starts empty)


def plugin_configurations(node) -> list[dict]:
    """Every filter plugin configuration (the JSON in `configuration.value` next to a
    `vm_config`) in an Envoy config or /config_dump."""
    return [
        json.loads(n["configuration"]["value"])
        for n in dicts_in(node)
        if isinstance(n.get("configuration"), dict)
        and "value" in n["configuration"]
        and "vm_config" in n
    ]


def test_hot_restart_with_new_filter_config_under_load(e2e_stack, make_user):
    old = e2e_stack.prepare_envoy(
        "hot", cls=HotRestartEnvoy, plugin_overrides={"cache_ttl_s": 3600}
    )
    old.start()
    users = [make_user("hot") for _ in range(6)]
    worker_of_user = place_users(old, users)
    load = SyncLoad(
        old.port,
        [d for u in users for d in u.devices],
        sync_timeout_ms=LONG_POLL_MS,
        client_timeout=30,
    )
    load.start(threads=8)
    time.sleep(2.0)

    restarted = time.monotonic()
    new = old.next_epoch(e2e_stack, plugin_overrides={"cache_ttl_s": 600})
    took_over = time.monotonic()
    exit_code = old.process.proc.wait(old.parent_shutdown_s + 30)
    parent_gone = time.monotonic()
    time.sleep(2.0)
    outcomes = load.stop()
    load.attach(old, new)

    assert exit_code == 0, f"the old Envoy exited with {exit_code}"
    new.process.check_alive()
    assert_answered_in_time(outcomes, LONG_POLL_MS / 1000 + MARGIN_S)
    assert all(o.routing_key == o.device.user_id for o in outcomes), "a user was not routed by user"
    moved = {
        u: w for u, w in worker_per_user(outcomes, old.workers).items() if w != {worker_of_user[u]}
    }
    assert not moved, f"users moved across the hot restart: {moved}"
    # Both processes served part of the load, and requests overlapped the hand-over.
    old_log = {e["user_agent"] for e in old.log_entries()}
    by_old = [o for o in outcomes if o.user_agent in old_log]
    by_new = [o for o in outcomes if o.user_agent not in old_log]
    assert by_old and by_new, (len(by_old), len(by_new))
    in_flight = [o for o in outcomes if o.started < took_over < o.started + o.elapsed]
    assert in_flight, "no request was in flight during the hot restart"
    # The new process runs the new filter configuration.
    (before,) = plugin_configurations(old.cfg)
    running = plugin_configurations(new.admin("/config_dump").json())
    assert running and all(c == {**before, "cache_ttl_s": 600} for c in running), running
    record_figures(
        "Envoy hot restart with new filter config",
        syncs=len(outcomes),
        served_by_old=len(by_old),
        served_by_new=len(by_new),
        in_flight_at_handover=len(in_flight),
        handover_s=round(took_over - restarted, 2),
        old_exit_after_s=round(parent_gone - restarted, 2),
        max_latency_s=round(max(o.elapsed for o in outcomes), 3),
    )
