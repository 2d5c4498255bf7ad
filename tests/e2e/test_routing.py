"""Routing through the real Envoy + filter to the Synapse listeners that play sync workers."""

from __future__ import annotations

import collections
import json
import time

from msrtest.env import HOST
from msrtest.matrix import FALLBACK_KEY
from msrtest.spread import samples_for_spread

OTHER_CASES = ["X-User-Identifier", "x-user-identifier", "X-USER-IDENTIFIER"]


def test_all_devices_of_a_user_land_on_one_worker(placed_users):
    users, seen = placed_users
    for user in users:
        per_device = {d.device_id: seen[d.device_id] for d in user.devices}
        workers = {w for ws in per_device.values() for w in ws}
        assert len(workers) == 1, f"{user.user_id} spread over workers: {per_device}"
        assert all(len(ws) == 3 for ws in per_device.values())


def test_users_spread_over_workers(placed_users, envoy):
    users, _ = placed_users
    by_worker = collections.Counter(u.worker for u in users)
    # samples_for_spread() users make "all on one worker" less likely than 1e-6.
    assert len(by_worker) >= 2, f"{len(users)} users all on one worker: {by_worker}"
    assert set(by_worker) <= set(envoy.workers.values())


def test_access_log_shows_the_user_id_as_routing_key(placed_users, envoy):
    users, _ = placed_users
    user = users[0]
    r = envoy.sync(user.devices[0].token)
    entry = envoy.log_entry(r.request_id)
    assert entry["user"] == user.user_id
    # A first sync (no `since`) is an initial one: its own route, whose pool (empty here) falls
    # back to the sync workers, hashed the same way.
    assert (entry["route"], entry["cluster"]) == ("sync_initial", "synapse_initial_sync")
    assert entry["sync_kind"] == "initial" and entry["key_source"] in ("cache", "whoami")
    assert "access_token" not in json.dumps(entry)


def test_tokenless_requests_spread_over_workers(envoy):
    """Without a token the filter sets no hash key; Envoy's ring hash then picks a random host
    for each request (it does not pin them all to one worker)."""
    n = samples_for_spread()
    workers = collections.Counter()
    for _ in range(n):
        r = envoy.sync(None)
        assert r.status == 401 and r.json()["errcode"] == "M_MISSING_TOKEN"
        entry = envoy.log_entry(r.request_id)
        assert entry["user"] is None, "no routing key may be set without a token"
        workers[envoy.worker_of(r)] += 1
    assert len(workers) >= 2, f"{n} token-less requests all on one worker: {workers}"


def test_spoofed_header_without_token_does_not_pin(envoy):
    n = samples_for_spread()
    workers = collections.Counter()
    for i in range(n):
        r = envoy.sync(None, extra_headers=[(OTHER_CASES[i % 3], "@victim:example.test")])
        entry = envoy.log_entry(r.request_id)
        assert entry["user"] is None, "the client's x-user-identifier reached the router"
        workers[envoy.worker_of(r)] += 1
    assert len(workers) >= 2, f"a spoofed header pinned token-less requests: {workers}"


def test_spoofed_header_does_not_move_a_user(placed_users, envoy):
    users, _ = placed_users
    user = users[0]
    others = [u for u in users if u.worker != user.worker]
    assert others, "test needs users on two workers"
    spoofs = [u.user_id for u in others[:5]] + ["@x:example.test", "~0123456789abcdef", "", "a b"]
    for i, value in enumerate(spoofs):
        device = user.devices[i % len(user.devices)]
        headers = [(OTHER_CASES[i % 3], value)]
        if i % 2:  # a second copy, in another case
            headers.append((OTHER_CASES[(i + 1) % 3], others[0].user_id))
        r = envoy.sync(device.token, extra_headers=headers)
        assert r.status == 200
        assert envoy.worker_of(r) == user.worker, f"spoofed value #{i} moved {user.user_id}"
        assert envoy.log_entry(r.request_id)["user"] == user.user_id


def test_token_in_query_parameter(placed_users, envoy):
    users, _ = placed_users
    for user in users[:3]:
        for device in user.devices:
            # Every character percent-encoded, e.g. access_token=%73%79%74%5F...
            r = envoy.sync(device.token, via="query")
            assert r.status == 200, r.body[:200]
            assert envoy.worker_of(r) == user.worker
            entry = envoy.log_entry(r.request_id)
            assert entry["user"] == user.user_id
            assert "access_token" not in json.dumps(entry)


def test_lower_case_bearer_scheme_gets_the_fallback_key(placed_users, envoy):
    """Synapse 1.163 accepts only the exact `Bearer ` scheme and answers `bearer` with 401
    M_MISSING_TOKEN; the filter mirrors it: no whoami, the per-token fallback key."""
    users, _ = placed_users
    r = envoy.sync(users[1].devices[0].token, scheme="bearer")
    assert r.status == 401 and r.json()["errcode"] == "M_MISSING_TOKEN", r.body[:200]
    entry = envoy.log_entry(r.request_id)
    assert FALLBACK_KEY.match(entry["user"] or ""), entry
    assert entry["details"] == "via_upstream"


def test_whole_sync_path_family_goes_to_the_users_worker(placed_users, envoy):
    users, _ = placed_users
    user = users[2]
    token = user.devices[0].token
    auth = [("Authorization", f"Bearer {token}")]
    requests = [
        ("GET", "/_matrix/client/r0/sync?timeout=0", None),
        ("GET", "/_matrix/client/v3/sync?timeout=0&full_state=true", None),
        ("GET", "/_matrix/client/v3/events?timeout=0", None),
        ("GET", "/_matrix/client/v3/initialSync?limit=1", None),
        ("GET", "/_matrix/client/v3/rooms/%21nowhere%3Aexample.test/initialSync", None),
        (
            "POST",
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout=0",
            json.dumps({"lists": {}}).encode(),
        ),
    ]
    for method, path, body in requests:
        headers = auth + ([("Content-Type", "application/json")] if body else [])
        r = envoy.request(method, path, headers, body)
        entry = envoy.log_entry(r.request_id)
        assert entry["cluster"] in ("synapse_sync_workers", "synapse_initial_sync"), (path, entry)
        assert entry["details"] == "via_upstream", (path, r.status, entry)
        assert entry["user"] == user.user_id, path
        assert envoy.worker_of(r) == user.worker, path
    # A real sliding sync answer comes back through the filter's pause for whoami.
    assert r.status == 200, r.body[:300]


def test_other_client_api_goes_to_main(placed_users, envoy, e2e_stack):
    users, _ = placed_users
    token = users[0].devices[0].token
    r = envoy.request(
        "GET", "/_matrix/client/v3/account/whoami", [("Authorization", f"Bearer {token}")]
    )
    assert r.status == 200 and r.json()["user_id"] == users[0].user_id
    entry = envoy.log_entry(r.request_id)
    assert entry["cluster"] == "synapse_main"
    assert entry["upstream_host"] == f"{HOST}:{e2e_stack.synapse.main_port}"
    assert entry["user"] is None, "the filter must leave non-sync requests alone"


def test_long_poll_sync_outlives_envoys_default_route_timeout(placed_users, envoy):
    """Envoy's default route timeout is 15 s; envoy.yaml disables it on the sync routes, so a
    sync that Synapse holds open for 16 s (nothing happens in an empty account) comes back 200."""
    users, _ = placed_users
    user = users[4]
    since = envoy.sync(user.devices[0].token).json()["next_batch"]
    started = time.monotonic()
    r = envoy.sync(user.devices[0].token, query={"timeout": "16000", "since": since})
    elapsed = time.monotonic() - started
    assert r.status == 200, (r.status, r.body[:200])
    assert elapsed >= 15.5, f"Synapse answered after {elapsed:.1f}s: not a long poll"
    assert envoy.worker_of(r) == user.worker
