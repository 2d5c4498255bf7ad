"""The clients of `just bench-synapse`: users, devices and rooms, and the load they make.

Plain HTTP over aiohttp (the HTTP library matrix-nio itself runs on), not matrix-nio: the load
generator shares two cores with the seven processes it measures, and nio builds an object model
of every sync response (events, rooms, members) that the bench does not need, while the bench
must control exactly what each device sends (its `since`, its filter, `timeout`, one keep-alive
connection per device). What the bench reads from a response is only `next_batch` and the
bodies of the timeline's messages.

- Setup (directly on the main process, not through Envoy): users registered with the admin API,
  each logs in its devices (device 1 is the registration's), rooms created public and joined
  (joins, not invites), one Element-like filter per user (`lazy_load_members`, timeline limit 20),
  and one initial sync per user whose `next_batch` every device of the user starts from.
- Windows: each device first makes one paced incremental sync with `timeout=0` (the clients
  reconnecting; at most `reconnect_concurrency` at once, so a freshly started Envoy meets new
  tokens below the filter's `max_whoami_in_flight`), then long-polls `/sync` (`since`,
  `timeout=30000`) through Envoy on its own keep-alive connection. Senders post messages at a
  fixed rate straight to the main process, round robin over the rooms, each by one of the room's
  members in turn. Every device records when it first saw each message (send → seen latency);
  a device that misses a message of its rooms makes the window invalid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import urllib.parse

import aiohttp

SYNC = "/_matrix/client/v3/sync"
LONG_POLL_MS = 30_000
# What an Element-like client asks for (lazy-loaded members; a short timeline).
CLIENT_FILTER = {
    "room": {
        "state": {"lazy_load_members": True},
        "timeline": {"limit": 20, "lazy_load_members": True},
    },
}


class LoadError(RuntimeError):
    pass


@dataclasses.dataclass
class Device:
    user_id: str
    device_id: str
    token: str = dataclasses.field(repr=False)
    since: str = ""
    filter_id: str = ""
    rooms: tuple[str, ...] = ()
    # This window's messages first seen by the device: body → loop time.
    seen: dict[str, float] = dataclasses.field(default_factory=dict, repr=False)
    syncs: int = 0
    errors: int = 0


@dataclasses.dataclass
class Population:
    users: list[str]
    devices: list[Device]
    rooms: dict[str, list[str]]  # room ID → member user IDs
    sender_token: dict[str, str] = dataclasses.field(repr=False, default_factory=dict)

    def devices_of(self, user_id: str) -> list[Device]:
        return [d for d in self.devices if d.user_id == user_id]


def room_plan(n_users: int, n_rooms: int) -> list[list[int]]:
    """Members (user indices) of each room: every user in two rooms (one if there is only one
    room), spread so that every room gets about 2 × n_users / n_rooms members."""
    rooms: list[list[int]] = [[] for _ in range(n_rooms)]
    for i in range(n_users):
        first = i % n_rooms
        rooms[first].append(i)
        if n_rooms > 1:
            second = (first + 1 + (i // n_rooms) % (n_rooms - 1)) % n_rooms
            rooms[second].append(i)
    return rooms


async def _json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None = None,
    body: dict | None = None,
    ok=(200,),
) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, json=body, headers=headers) as r:
        data = await r.read()
        if r.status not in ok:
            raise LoadError(f"{method} {url.split('?')[0]}: {r.status} {data[:300]!r}")
        return json.loads(data)


async def populate(main, n_users: int, n_devices: int, n_rooms: int, progress) -> Population:
    """Register the users, log in their devices, create and join the rooms, upload the filters,
    and give every device the `since` of one initial sync of its user (all on `main`)."""
    base = f"http://127.0.0.1:{main.main_port}"
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    # The admin registration API (stack.Synapse.register: blocking, HMAC'd nonce).
    first = await asyncio.gather(
        *(loop.run_in_executor(None, main.register, f"bench{i}") for i in range(n_users))
    )
    users = [d.user_id for d in first]
    progress(f"registered {n_users} users ({time.monotonic() - started:.1f}s)")
    connector = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=connector) as s:
        gate = asyncio.Semaphore(8)

        async def login(user_id: str, k: int) -> Device:
            async with gate:
                data = await _json(
                    s,
                    "POST",
                    f"{base}/_matrix/client/v3/login",
                    body={
                        "type": "m.login.password",
                        "identifier": {"type": "m.id.user", "user": user_id},
                        "password": main.passwords[user_id],
                        "initial_device_display_name": f"bench device {k + 1}",
                    },
                )
            return Device(data["user_id"], data["device_id"], data["access_token"])

        more = await asyncio.gather(*(login(u, k) for u in users for k in range(1, n_devices)))
        devices = [Device(d.user_id, d.device_id, d.token) for d in first] + list(more)
        devices.sort(key=lambda d: users.index(d.user_id))
        progress(f"logged in {len(devices)} devices ({time.monotonic() - started:.1f}s)")

        token = {u: d.token for u, d in zip(users, first, strict=True)}
        plan = room_plan(n_users, n_rooms)
        rooms: dict[str, list[str]] = {}
        for k, members in enumerate(plan):
            creator = users[members[0]]
            created = await _json(
                s,
                "POST",
                f"{base}/_matrix/client/v3/createRoom",
                token[creator],
                {"preset": "public_chat", "name": f"room {k}"},
            )
            rooms[created["room_id"]] = [users[i] for i in members]

        async def join(room_id: str, user_id: str) -> None:
            async with gate:
                await _json(
                    s,
                    "POST",
                    f"{base}/_matrix/client/v3/join/{urllib.parse.quote(room_id)}",
                    token[user_id],
                    {},
                )

        await asyncio.gather(*(join(r, u) for r, members in rooms.items() for u in members[1:]))
        progress(
            f"{len(rooms)} rooms of {min(map(len, rooms.values()))}–"
            f"{max(map(len, rooms.values()))} members joined "
            f"({time.monotonic() - started:.1f}s)"
        )

        async def prepare(user_id: str) -> None:
            async with gate:
                quoted = urllib.parse.quote(user_id)
                fid = (
                    await _json(
                        s,
                        "POST",
                        f"{base}/_matrix/client/v3/user/{quoted}/filter",
                        token[user_id],
                        CLIENT_FILTER,
                    )
                )["filter_id"]
                first_sync = await _json(
                    s, "GET", f"{base}{SYNC}?timeout=0&filter={fid}", token[user_id]
                )
            mine = tuple(r for r, members in rooms.items() if user_id in members)
            for d in devices:
                if d.user_id == user_id:
                    d.filter_id, d.since, d.rooms = fid, first_sync["next_batch"], mine

        await asyncio.gather(*(prepare(u) for u in users))
        progress(f"filters uploaded and initial syncs done ({time.monotonic() - started:.1f}s)")
    return Population(users, devices, rooms, token)


@dataclasses.dataclass
class WindowLoad:
    """What the clients did and saw in one window."""

    sent: dict[str, tuple[str, float]]  # body → (room, loop time before the send)
    expected: int  # deliveries expected: every device of every member, every message
    delivered: int  # deliveries seen (each message counted once per device)
    missing: int
    latencies_ms: list[float]
    syncs: int  # /sync requests the devices made through Envoy
    errors: int  # /sync answers other than 200, and connection errors
    send_errors: int
    reconnect_s: float


class Clients:
    """The devices of a population long-polling through one Envoy (one window)."""

    def __init__(self, pop: Population, envoy_port: int, main_port: int, tag: str):
        self.pop = pop
        self.envoy = f"http://127.0.0.1:{envoy_port}"
        self.main = f"http://127.0.0.1:{main_port}"
        self.tag = tag  # unique per window: only this window's messages are counted
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.polls: list[asyncio.Task] = []
        self.sent: dict[str, tuple[str, float]] = {}
        self.send_errors = 0
        self.reconnect_s = 0.0

    async def __aenter__(self) -> Clients:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=LONG_POLL_MS / 1000 + 30
        )
        for d in self.pop.devices:
            d.seen, d.syncs, d.errors = {}, 0, 0
            # One keep-alive connection per device, as a real client has.
            self.sessions[d.device_id] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), timeout=timeout
            )
        return self

    async def __aexit__(self, *_) -> None:
        await self.stop_polls()
        await asyncio.gather(*(s.close() for s in self.sessions.values()))

    async def _sync(self, d: Device, timeout_ms: int) -> None:
        url = (
            f"{self.envoy}{SYNC}?since={urllib.parse.quote(d.since)}&timeout={timeout_ms}"
            f"&filter={d.filter_id}"
        )
        session = self.sessions[d.device_id]
        d.syncs += 1
        try:
            async with session.get(url, headers={"Authorization": f"Bearer {d.token}"}) as r:
                data = await r.read()
                if r.status != 200:
                    d.errors += 1
                    await asyncio.sleep(1)
                    return
        except (TimeoutError, aiohttp.ClientError):
            d.errors += 1
            await asyncio.sleep(1)
            return
        now = asyncio.get_running_loop().time()
        body = json.loads(data)
        prefix = f"{self.tag} "
        for room in body.get("rooms", {}).get("join", {}).values():
            for e in room.get("timeline", {}).get("events", []):
                text = e.get("content", {}).get("body")
                if isinstance(text, str) and text.startswith(prefix) and text not in d.seen:
                    d.seen[text] = now
        d.since = body.get("next_batch", d.since)

    async def reconnect(self, concurrency: int) -> None:
        """One `timeout=0` sync per device, at most `concurrency` at once."""
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)

        async def one(d: Device) -> None:
            async with gate:
                await self._sync(d, 0)

        await asyncio.gather(*(one(d) for d in self.pop.devices))
        self.reconnect_s = time.monotonic() - started

    def start_polls(self) -> None:
        async def loop(d: Device) -> None:
            while True:
                await self._sync(d, LONG_POLL_MS)

        self.polls = [asyncio.create_task(loop(d)) for d in self.pop.devices]

    async def stop_polls(self) -> None:
        for t in self.polls:
            t.cancel()
        await asyncio.gather(*self.polls, return_exceptions=True)
        self.polls = []

    async def send(self, n: int, rate: float) -> None:
        """n messages at `rate` per second straight to the main process, round robin over the
        rooms, each room's members taking turns."""
        rooms = list(self.pop.rooms)
        turn = dict.fromkeys(rooms, 0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as s:
            for k in range(n):
                delay = t0 + k / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                room = rooms[k % len(rooms)]
                members = self.pop.rooms[room]
                sender = members[turn[room] % len(members)]
                turn[room] += 1
                body = f"{self.tag} {k}"
                url = (
                    f"{self.main}/_matrix/client/v3/rooms/{urllib.parse.quote(room)}"
                    f"/send/m.room.message/{secrets.token_hex(8)}"
                )
                self.sent[body] = (room, loop.time())
                try:
                    await _json(
                        s,
                        "PUT",
                        url,
                        self.pop.sender_token[sender],
                        {"msgtype": "m.text", "body": body},
                    )
                except (TimeoutError, LoadError, aiohttp.ClientError):
                    self.send_errors += 1
                    del self.sent[body]

    def _missing(self) -> int:
        missing = 0
        for d in self.pop.devices:
            rooms = set(d.rooms)
            missing += sum(1 for b, (r, _) in self.sent.items() if r in rooms and b not in d.seen)
        return missing

    async def drain(self, timeout: float) -> None:
        """Wait until every device has seen every message of its rooms (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while self._missing() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def result(self) -> WindowLoad:
        latencies, delivered, expected = [], 0, 0
        for d in self.pop.devices:
            rooms = set(d.rooms)
            for body, (room, sent_at) in self.sent.items():
                if room not in rooms:
                    continue
                expected += 1
                if body in d.seen:
                    delivered += 1
                    latencies.append((d.seen[body] - sent_at) * 1000)
        return WindowLoad(
            sent=dict(self.sent),
            expected=expected,
            delivered=delivered,
            missing=expected - delivered,
            latencies_ms=latencies,
            syncs=sum(d.syncs for d in self.pop.devices),
            errors=sum(d.errors for d in self.pop.devices),
            send_errors=self.send_errors,
            reconnect_s=self.reconnect_s,
        )
