"""Route metadata in the real Envoy in front of the real Synapse: initial syncs to their own pool
(falling back to the sync workers when it has no healthy host), room endpoints hashed by room,
and the key's source and sync kind in the access log (filter state). envoy.yaml as shipped, with
only ports substituted: Synapse's listeners play the sync pool, the initial-sync pool and the
room workers.
"""

from __future__ import annotations

import collections
import json
import urllib.parse

import pytest

from msrtest.env import ENVOY_YAML, free_ports
from msrtest.envoy import Envoy, uncomment_block
from msrtest.httpclient import Response
from msrtest.spread import samples_for_spread


@pytest.fixture(scope="module")
def split_envoy(e2e_stack):
    """Sync pool: the first two listeners; initial-sync pool: the third."""
    ports = e2e_stack.synapse.worker_ports
    envoy = e2e_stack.add_envoy("split", sync_ports=ports[:2], initial_sync_ports=ports[2:])
    yield envoy, ports
    envoy.stop()


def upstream_port(envoy: Envoy, response: Response) -> int:
    return int(envoy.log_entry(response.request_id)["upstream_host"].rsplit(":", 1)[1])


def test_initial_syncs_go_to_their_pool_and_incremental_ones_to_the_users_worker(
    split_envoy, make_user
):
    envoy, ports = split_envoy
    sync_pool, initial_pool = set(ports[:2]), ports[2]
    for user in [make_user("split", n_devices=2) for _ in range(6)]:
        workers = set()
        for device in user.devices:
            first = envoy.sync(device.token)
            assert first.status == 200
            entry = envoy.log_entry(first.request_id)
            assert (entry["route"], entry["sync_kind"]) == ("sync_initial", "initial"), entry
            assert upstream_port(envoy, first) == initial_pool
            since = first.json()["next_batch"]
            later = envoy.sync(device.token, query={"since": since, "timeout": "0"})
            entry = envoy.log_entry(later.request_id)
            assert (entry["route"], entry["sync_kind"]) == ("sync", "incremental"), entry
            assert upstream_port(envoy, later) in sync_pool
            workers.add(upstream_port(envoy, later))
            full = envoy.sync(
                device.token, query={"since": since, "full_state": "true", "timeout": "0"}
            )
            assert upstream_port(envoy, full) == initial_pool
        assert len(workers) == 1, f"{user.user_id}'s incremental syncs split over {workers}"


def test_a_client_cannot_choose_the_initial_pool(split_envoy, make_user):
    envoy, ports = split_envoy
    device = make_user("chooser", n_devices=1).devices[0]
    first = envoy.sync(device.token)
    since = first.json()["next_batch"]
    r = envoy.sync(
        device.token,
        query={"since": since, "timeout": "0"},
        extra_headers=[("X-MSR-Sync-Kind", "initial")],
    )
    assert envoy.log_entry(r.request_id)["sync_kind"] == "incremental"
    assert upstream_port(envoy, r) in set(ports[:2])


def test_without_a_healthy_initial_pool_initial_syncs_reach_the_sync_workers(e2e_stack, make_user):
    (dead,) = free_ports(1)  # nothing listens: the pool's health check fails
    ports = e2e_stack.synapse.worker_ports
    envoy = e2e_stack.add_envoy("nopool", sync_ports=ports[:2], initial_sync_ports=[dead])
    try:
        device = make_user("nopool", n_devices=1).devices[0]
        r = envoy.sync(device.token)
        assert r.status == 200
        assert envoy.log_entry(r.request_id)["route"] == "sync_initial"
        assert upstream_port(envoy, r) in set(ports[:2])
    finally:
        envoy.stop()


def create_room(envoy: Envoy, token: str) -> str:
    body = json.dumps({"preset": "public_chat"}).encode()
    r = envoy.request(
        "POST",
        "/_matrix/client/v3/createRoom",
        [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")],
        body,
    )
    assert r.status == 200, r.body[:300]
    return r.json()["room_id"]


def test_room_requests_reach_one_worker_per_room_whoever_asks(envoy, make_user):
    owner, other = make_user("roomowner", n_devices=1), make_user("roomreader", n_devices=1)
    rooms = [create_room(envoy, owner.devices[0].token) for _ in range(samples_for_spread())]
    per_room: dict[str, set[str]] = collections.defaultdict(set)
    for room in rooms:
        quoted = urllib.parse.quote(room, safe="")
        for token in (owner.devices[0].token, other.devices[0].token):
            for path in (f"/rooms/{quoted}/messages?dir=b&limit=1", f"/rooms/{quoted}/members"):
                r = envoy.request(
                    "GET", f"/_matrix/client/v3{path}", [("Authorization", f"Bearer {token}")]
                )
                entry = envoy.log_entry(r.request_id)
                assert entry["route"] == "rooms" and entry["room"] == room, entry
                assert r.status in (200, 403), (r.status, r.body[:200])
                per_room[room].add(entry["upstream_host"])
    assert all(len(hosts) == 1 for hosts in per_room.values()), per_room
    assert len({h for hosts in per_room.values() for h in hosts}) >= 2, "rooms did not spread"


def test_a_spoofed_room_header_is_replaced(envoy, make_user):
    owner = make_user("roomspoof", n_devices=1)
    room = create_room(envoy, owner.devices[0].token)
    quoted = urllib.parse.quote(room, safe="")
    r = envoy.request(
        "GET",
        f"/_matrix/client/v3/rooms/{quoted}/messages?dir=b",
        [("Authorization", f"Bearer {owner.devices[0].token}"), ("X-Room-Identifier", "!victim:x")],
    )
    assert envoy.log_entry(r.request_id)["room"] == room


def test_the_access_log_shows_where_each_key_came_from(envoy, make_user):
    device = make_user("source", n_devices=1).devices[0]
    first, second = envoy.sync(device.token), envoy.sync(device.token)
    none = envoy.sync(None)
    bad = envoy.sync("syt_bm9ib2R5_NotARealTokenAtAll_0abcde")
    sources = [envoy.log_entry(r.request_id)["key_source"] for r in (first, second, none, bad)]
    assert sources == ["whoami", "cache", "none", "fallback"]


def with_debug_headers(workdir):
    """envoy.yaml with its commented-out debug-response-headers block turned on, and nothing
    else changed: the block as shipped is what is tested."""
    text, _ = uncomment_block(ENVOY_YAML.read_text(), "debug-response-headers")
    path = workdir / "envoy-debug-headers.yaml"
    path.write_text(text)
    return path


def test_debug_response_headers_are_off_as_shipped(envoy, make_user):
    device = make_user("nodebug", n_devices=1).devices[0]
    r = envoy.sync(device.token)
    assert r.status == 200
    assert not [h for h in r.headers if h.startswith("x-msr-")], r.headers


def test_debug_response_headers_tell_source_kind_and_room_and_never_the_token(e2e_stack, make_user):
    ports = e2e_stack.synapse.worker_ports
    envoy = e2e_stack.prepare_envoy(
        "debughdr",
        sync_ports=ports[:2],
        initial_sync_ports=ports[2:],
        source=with_debug_headers(e2e_stack.dir),
    )
    envoy.start()
    try:
        device = make_user("debughdr", n_devices=1).devices[0]
        first = envoy.sync(device.token)
        since = first.json()["next_batch"]
        later = envoy.sync(device.token, query={"since": since, "timeout": "0"})
        none = envoy.sync(None)
        bad_token = "syt_bm9ib2R5_NotARealTokenAtAll_0abcde"
        bad = envoy.sync(bad_token)
        # A client (or upstream) cannot plant these: the proxy overwrites them.
        spoof = envoy.sync(
            device.token,
            query={"since": since, "timeout": "0"},
            extra_headers=[("X-MSR-Key-Source", "whoami")],
        )
        got = [
            (r.headers.get("x-msr-key-source"), r.headers.get("x-msr-sync-kind"))
            for r in (first, later, none, bad, spoof)
        ]
        assert got == [
            ("whoami", "initial"),
            ("cache", "incremental"),
            ("none", "initial"),
            ("fallback", "initial"),
            ("cache", "incremental"),
        ], got
        room = create_room(envoy, device.token)
        quoted = urllib.parse.quote(room, safe="")
        r = envoy.request(
            "GET",
            f"/_matrix/client/v3/rooms/{quoted}/messages?dir=b&limit=1",
            [("Authorization", f"Bearer {device.token}")],
        )
        assert r.status == 200 and r.headers.get("x-msr-room") == room, r.headers
        assert "x-msr-room" not in later.headers  # not a room request: no room header
        for resp in (first, later, none, bad, spoof, r):
            text = " ".join(f"{k}: {v}" for k, v in resp.headers.items())
            for token in (device.token, bad_token):
                assert token not in text and token[-12:] not in text
    finally:
        envoy.stop()
