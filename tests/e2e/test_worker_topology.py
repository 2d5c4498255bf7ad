"""Real Synapse workers behind Envoy and the filter (issue 7, "Real worker topology").

PostgreSQL, Redis, the Synapse main process and generic_worker pools (2 sync workers, 1
initial-sync worker, 2 room workers; workers.py) run on 127.0.0.1; Envoy runs envoy.yaml with
the filter. matrix-nio logs in two devices per user through Envoy; one device creates a room and
sends a message while the other waits in a long-poll sync. What each process served is read from
its OWN log ("Processed request" lines name the requester), not from Envoy's view of it.

Skipped (visible reason) when PostgreSQL or Redis is not installed (`just e2e-workers` installs
them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import secrets
import time
import urllib.parse

import nio
import pytest

from msrtest import workers
from msrtest.env import WASM
from msrtest.httpclient import http_request
from msrtest.procs import wait_until
from msrtest.spread import samples_for_spread

# Two sync workers each own about half of the 1024-entry ring; 0.6 leaves a wide margin.
SYNC_WORKER_MAX_SHARE = 0.6
N_USERS = samples_for_spread(SYNC_WORKER_MAX_SHARE)  # 29 with FALSE_FAILURE = 1e-6
CONCURRENT_USERS = 8  # users whose scenarios run at once (a 2-core box runs all of this)
LONG_POLL_MS = 30_000
SEND_DELAY_S = 1.0  # how long the long-poll has been waiting when the message is sent
# The room endpoints envoy.yaml's `rooms` route sends to the room pool (the filter's room_paths).
ROOM_ENDPOINT = re.compile(
    r"^/_matrix/client/((api/v1|r0|v3|unstable)/rooms/[^/]+/(messages|context|members|"
    r"joined_members|state|event|send|redact|relations|threads|typing|receipt|read_markers|"
    r"timestamp_to_event)|v1/rooms/[^/]+/(relations|threads|hierarchy|timestamp_to_event))(/.*)?$"
)


@dataclasses.dataclass
class UserRun:
    """What one user's two nio devices did and saw."""

    user_id: str
    room_id: str = ""
    event_id: str = ""
    body: str = ""
    syncs: int = 0  # /sync requests the two devices made through Envoy
    received: bool = False  # the other device's sync delivered the message
    poll_waited_s: float = 0.0  # how long the delivering long-poll had waited before the send
    delivered_after_s: float = 0.0  # send → the other device's sync returned with it
    token: str = dataclasses.field(default="", repr=False)  # device A's, for direct requests


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def topology(request):
    """The whole topology plus an Envoy in front of it, started once for this module."""
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing (run `just build` / `just e2e`)")
    try:
        topo = workers.WorkerStack(WASM)
    except workers.MissingDependency as exc:
        pytest.skip(f"real worker topology needs PostgreSQL and Redis: {exc}")
    topo.start()
    try:
        envoy = topo.add_envoy()
    except BaseException:
        topo.close(keep_dir=True)
        raise
    _report(request, f"worker topology start-up (s): {topo.timings}")
    yield topo, envoy
    failed = request.session.testsfailed > 0
    topo.close(keep_dir=failed)
    if failed:
        _report(request, f"worker topology logs kept in {topo.dir}")


def _report(request, line: str) -> None:
    """A line on the terminal even while pytest captures output (timings for the CI log)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    if capture is None:
        reporter.write_line(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{line}")


async def _sync(client: nio.AsyncClient, run: UserRun, **kwargs) -> nio.SyncResponse:
    response = await client.sync(**kwargs)
    run.syncs += 1
    assert isinstance(response, nio.SyncResponse), (run.user_id, response)
    return response


def _timeline_bodies(response: nio.SyncResponse, room_id: str) -> list[str]:
    room = response.rooms.join.get(room_id)
    return [getattr(e, "body", None) for e in room.timeline.events] if room else []


async def _user_scenario(url: str, user_id: str, password: str) -> UserRun:
    """Devices A and B of one user: log in, initial sync, A creates a room, B long-polls and is
    woken by A's message; A reads the room's history (a room-keyed request)."""
    run = UserRun(user_id)
    a = nio.AsyncClient(url, user_id, store_path=None)
    b = nio.AsyncClient(url, user_id, store_path=None)
    try:
        for client, name in ((a, "A"), (b, "B")):
            login = await client.login(password, device_name=f"topology {name}")
            assert isinstance(login, nio.LoginResponse), (user_id, login)
            await _sync(client, run, timeout=0, full_state=True)  # an initial sync (no since)
        run.token = a.access_token
        created = await a.room_create(name=f"room of {user_id}")
        assert isinstance(created, nio.RoomCreateResponse), (user_id, created)
        run.room_id = created.room_id

        # B sees the new room (a long-poll woken by the room's creation), then drains.
        deadline = time.monotonic() + 60
        while run.room_id not in b.rooms:
            assert time.monotonic() < deadline, f"{user_id}: device B never saw the new room"
            await _sync(b, run, timeout=10_000)
        await _sync(b, run, timeout=0)

        run.body = f"hello from A {secrets.token_hex(4)}"
        poll_started = time.monotonic()
        poll = asyncio.create_task(_sync(b, run, timeout=LONG_POLL_MS))
        await asyncio.sleep(SEND_DELAY_S)
        sent_at = time.monotonic()
        content = {"msgtype": "m.text", "body": run.body}
        sent = await a.room_send(run.room_id, "m.room.message", content)
        assert isinstance(sent, nio.RoomSendResponse), (user_id, sent)
        run.event_id = sent.event_id
        while True:  # an unrelated wake-up (e.g. late room state) is followed by another poll
            response = await poll
            if run.body in _timeline_bodies(response, run.room_id):
                run.received = True
                run.delivered_after_s = time.monotonic() - sent_at
                run.poll_waited_s = sent_at - poll_started
                break
            if time.monotonic() - sent_at > 60:
                break
            poll_started = time.monotonic()
            poll = asyncio.create_task(_sync(b, run, timeout=LONG_POLL_MS))

        await _sync(a, run, timeout=0)  # an incremental sync of A
        history = await a.room_messages(run.room_id, start=a.next_batch, limit=20)
        assert isinstance(history, nio.RoomMessagesResponse), (user_id, history)
        return run
    finally:
        await a.close()
        await b.close()


async def _all_users(url: str, users: list[tuple[str, str]]) -> list[UserRun]:
    gate = asyncio.Semaphore(CONCURRENT_USERS)

    async def one(user_id: str, password: str) -> UserRun:
        async with gate:
            return await _user_scenario(url, user_id, password)

    return await asyncio.gather(*(one(u, p) for u, p in users))


@pytest.fixture(scope="module")
def conversation(topology, request):
    """N_USERS users × 2 nio devices through Envoy (registered directly on the main process)."""
    topo, envoy = topology
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        devices = list(pool.map(topo.main.register, [f"topo{i}" for i in range(N_USERS)]))
    users = [(d.user_id, topo.main.passwords[d.user_id]) for d in devices]
    registered = time.monotonic()
    runs = asyncio.run(_all_users(envoy.url, users))
    placed: dict[str, int] = {}
    for where in _served_syncs(topo).values():
        for process in where:
            placed[process] = placed.get(process, 0) + 1
    woken = sum(r.poll_waited_s >= SEND_DELAY_S * 0.9 for r in runs)
    _report(
        request,
        f"{N_USERS} users registered in {registered - started:.1f}s; their 2 devices each"
        f" through Envoy: {time.monotonic() - registered:.1f}s;"
        f" users per process (own logs): {placed}; {woken}/{len(runs)} messages woke a"
        f" waiting long-poll; delivery after send max"
        f" {max(r.delivered_after_s for r in runs):.2f}s",
    )
    return runs


def _served_syncs(topo: workers.WorkerStack) -> dict[str, dict[str, int]]:
    """{requester: {process name: /sync requests it served}}, from every process's own log."""
    by_user: dict[str, dict[str, int]] = {}
    for process, requests in topo.served().items():
        for r in requests:
            if workers.SYNC_PATH.match(r.path):
                counts = by_user.setdefault(r.requester, {})
                counts[process] = counts.get(process, 0) + 1
    return by_user


# --------------------------------------------------------------------------------------------
# what works today


def test_each_users_syncs_are_served_by_exactly_one_sync_worker(topology, conversation):
    """Every sync the two devices made is in the workers' logs: the initial ones in the
    initial-sync pool's, every other one in one sync worker's."""
    topo, _ = topology
    served = _served_syncs(topo)
    sync_pool = {w.name for w in topo.pool("sync")}
    initial_pool = {w.name for w in topo.pool("initial_sync")}
    for run in conversation:
        where = served.get(run.user_id, {})
        assert sum(where.values()) == run.syncs, (run.user_id, where, run.syncs)
        incremental = {w: n for w, n in where.items() if w not in initial_pool}
        assert len(incremental) == 1 and set(incremental) <= sync_pool, (
            f"{run.user_id}'s incremental syncs (both devices, long-polls) were served by {where}"
        )


def test_both_sync_workers_serve_users(topology, conversation):
    topo, _ = topology
    served = _served_syncs(topo)
    users_per_worker: dict[str, int] = {}
    initial_pool = {w.name for w in topo.pool("initial_sync")}
    for run in conversation:
        (worker,) = [w for w in served[run.user_id] if w not in initial_pool]
        users_per_worker[worker] = users_per_worker.get(worker, 0) + 1
    assert set(users_per_worker) == {w.name for w in topo.pool("sync")}, users_per_worker


def test_a_long_poll_on_a_sync_worker_is_woken_by_a_message_sent_through_a_room_worker(
    topology, conversation
):
    """The message is sent through a room worker (envoy.yaml's room route), persisted by the
    main process, and reaches the other device's long-poll on a sync worker: only replication
    carries it there."""
    topo, _ = topology
    for run in conversation:
        assert run.received, f"{run.user_id}: device B's syncs never delivered A's message"
        # Delivered while the long-poll was still open (not by its 30 s timeout).
        assert run.delivered_after_s < LONG_POLL_MS / 1000 - 5, run
    woken = [r for r in conversation if r.poll_waited_s >= SEND_DELAY_S * 0.9]
    # Nearly every delivering poll had been waiting since before the send (an unrelated early
    # wake-up, e.g. by late room state, makes a later poll deliver it instead).
    assert len(woken) >= len(conversation) * 0.75, [r for r in conversation if r not in woken]
    sends = [
        r
        for w in topo.pool("room")
        for r in w.processed_requests()
        if "/send/m.room.message/" in r.path and r.status == "200"
    ]
    assert {r.requester for r in sends} >= {r.user_id for r in conversation}, (
        "the messages were not all sent through the room workers"
    )


def test_pool_workers_answer_the_client_api_with_replicated_data(topology, conversation):
    """The initial-sync and room workers the routes of issue 7 will use are real workers: asked
    directly, they know the rooms and messages the main process wrote, and a message sent
    through a room worker is persisted and read back by the others."""
    topo, _ = topology
    run = conversation[0]
    auth = [("Authorization", f"Bearer {run.token}")]
    for worker in topo.pool("initial_sync"):
        r = http_request(worker.port, "GET", "/_matrix/client/v3/sync?timeout=0", auth)
        assert r.status == 200, (worker.name, r.status, r.body[:200])
        timeline = r.json()["rooms"]["join"][run.room_id]["timeline"]["events"]
        assert run.body in [e.get("content", {}).get("body") for e in timeline], worker.name
    room = urllib.parse.quote(run.room_id)
    sent_by = {}
    for worker in topo.pool("room"):
        # An event created on a worker is persisted by the main process (HTTP replication to
        # instance_map.main) ...
        body = json.dumps({"msgtype": "m.text", "body": f"via {worker.name}"}).encode()
        path = f"/_matrix/client/v3/rooms/{room}/send/m.room.message/{worker.name}"
        r = http_request(
            worker.port, "PUT", path, [*auth, ("Content-Type", "application/json")], body
        )
        assert r.status == 200, (worker.name, r.status, r.body[:200])
        sent_by[r.json()["event_id"]] = worker.name
    for worker in topo.pool("room"):
        # ... and every worker reads all of them (and A's message) back.
        path = f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=20"

        def history(w=worker, path=path):
            r = http_request(w.port, "GET", path, auth)
            assert r.status == 200, (w.name, r.status, r.body[:200])
            ids = {e["event_id"] for e in r.json()["chunk"]}
            return ids if ids >= {run.event_id, *sent_by} else None

        wait_until(history, 10, f"{worker.name} to read every message of {run.room_id}")
    for worker in [*topo.pool("initial_sync"), *topo.pool("room")]:
        requesters = wait_until(
            lambda w=worker: {p.requester for p in w.processed_requests()},
            10,
            f"{worker.name}'s own log of the direct requests",
        )
        # (These workers also served the conversation through Envoy's routes.)
        assert run.user_id in requesters, (worker.name, requesters)
        assert topo.role_of(worker.port) == worker.role


def test_no_worker_logged_a_server_error(topology, conversation):
    topo, _ = topology
    errors = {
        name: [f"{r.status} {r.method} {r.path}" for r in requests if r.status.startswith("5")]
        for name, requests in topo.served().items()
    }
    assert not any(errors.values()), errors


# --------------------------------------------------------------------------------------------
# route metadata (envoy.yaml as shipped: sync_kind_header and room_header_name are on)


def test_initial_syncs_reach_the_initial_sync_pool_when_enabled(topology, conversation):
    """Syncs without `since` (each device's first, nio's full_state=true) on the initial-sync
    pool; the rest on the user's sync worker."""
    topo, _ = topology
    users = {r.user_id for r in conversation}
    for process, requests in topo.served().items():
        for r in requests:
            if r.requester in users and workers.SYNC_PATH.match(r.path):
                initial = "since=" not in r.query or "full_state=true" in r.query
                assert topo.role_of(r.port) == ("initial_sync" if initial else "sync"), (process, r)


def test_room_keyed_requests_reach_one_room_worker_per_room(topology, conversation):
    """Every request under /rooms/{room_id}/ of one room served by one room worker, and the
    rooms spread over the room pool."""
    topo, _ = topology
    # The first user's room is also asked directly on every room worker (the pool-worker test).
    rooms = {r.room_id for r in conversation[1:]}
    worker_of_room: dict[str, set[str]] = {}
    for process, requests in topo.served().items():
        for r in requests:
            room = workers.room_of(r.path)
            if room in rooms and ROOM_ENDPOINT.match(r.path):
                worker_of_room.setdefault(room, set()).add(process)
    room_pool = {w.name for w in topo.pool("room")}
    for room, where in worker_of_room.items():
        assert len(where) == 1 and where <= room_pool, (room, where)
    assert set().union(*worker_of_room.values()) == room_pool
