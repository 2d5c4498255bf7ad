"""Concurrent /sync load through an Envoy, for the fault, restart, remap and soak tests.

Every request carries its own User-Agent (`msr-load/<run>/<n>`), which Envoy's access log records,
so each outcome is matched to its log entry (the worker that served it, the routing key the
filter set) even when the client gave up before any answer (no x-request-id to go by).
Each device remembers its `next_batch`, so after its first sync every request is an incremental
`/sync?since=...&timeout=...` as a real client sends it.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from msrtest.env import E2E_DIR
from msrtest.envoy import Envoy
from msrtest.httpclient import http_request
from msrtest.matrix import SYNC_PATH, Device
from msrtest.procs import wait_until

# The filter's per-token fallback routing key (a keyed hash of the token, never the token).
FALLBACK_KEY = re.compile(r"^~[0-9a-f]{16}$")


@dataclasses.dataclass
class Outcome:
    """One sync request of the load."""

    device: Device
    user_agent: str
    started: float  # time.monotonic()
    elapsed: float  # seconds until the answer (or until the client gave up)
    status: int | None  # None: no HTTP answer (client timeout, refused, reset)
    error: str = ""
    entry: dict | None = None  # Envoy's access log entry (see SyncLoad.attach)

    @property
    def routing_key(self) -> str | None:
        return None if self.entry is None else self.entry.get("user")

    @property
    def upstream_host(self) -> str | None:
        return None if self.entry is None else self.entry.get("upstream_host")


class SyncLoad:
    """Sync requests for a set of devices, either in rounds (`run_round`) or continuously from
    background threads (`start` … `stop`)."""

    def __init__(
        self,
        port: int,
        devices: Iterable[Device],
        *,
        sync_timeout_ms: int = 0,
        client_timeout: float = 30.0,
    ):
        self.port = port
        self.devices = list(devices)
        self.sync_timeout_ms = sync_timeout_ms
        self.client_timeout = client_timeout
        self.run_id = secrets.token_hex(4)
        self.outcomes: list[Outcome] = []
        self._since: dict[str, str] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- one request ---------------------------------------------------------------------------

    def sync_once(self, device: Device) -> Outcome:
        """One /sync of `device` (incremental once it has a next_batch); recorded."""
        ua = f"msr-load/{self.run_id}/{next(self._seq)}"
        params = {"timeout": str(self.sync_timeout_ms)}
        since = self._since.get(device.device_id)
        if since:
            params["since"] = since
        headers = [("Authorization", f"Bearer {device.token}"), ("User-Agent", ua)]
        started = time.monotonic()
        status, error = None, ""
        try:
            r = http_request(
                self.port,
                "GET",
                f"{SYNC_PATH}?{urllib.parse.urlencode(params)}",
                headers,
                timeout=self.client_timeout,
            )
            status = r.status
            if r.status == 200:
                self._since[device.device_id] = r.json()["next_batch"]
            else:
                error = r.body[:200].decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {exc}"
        outcome = Outcome(device, ua, started, time.monotonic() - started, status, error)
        with self._lock:
            self.outcomes.append(outcome)
        return outcome

    # --- rounds --------------------------------------------------------------------------------

    def run_round(
        self, threads: int = 16, devices: Iterable[Device] | None = None
    ) -> list[Outcome]:
        """Every device (or `devices`) syncs once, `threads` at a time; their outcomes."""
        todo = list(self.devices if devices is None else devices)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(self.sync_once, todo))

    # --- continuous ----------------------------------------------------------------------------

    def start(self, threads: int = 6, pause: float = 0.0) -> SyncLoad:
        """`threads` background loops, each syncing the next idle device in turn until stop().
        Like a real client, a device has at most one sync in flight (needs more devices than
        threads)."""
        if threads >= len(self.devices):
            raise ValueError("need more devices than threads")
        cycle = itertools.cycle(self.devices)
        cycle_lock = threading.Lock()
        busy: set[str] = set()

        def take() -> Device:
            with cycle_lock:
                while True:
                    device = next(cycle)
                    if device.device_id not in busy:
                        busy.add(device.device_id)
                        return device

        def loop():
            while not self._stop.is_set():
                device = take()
                try:
                    self.sync_once(device)
                finally:
                    with cycle_lock:
                        busy.discard(device.device_id)
                if pause:
                    self._stop.wait(pause)

        for _ in range(threads):
            t = threading.Thread(target=loop, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        """Stop the loops (each finishes its request in flight); every outcome so far."""
        self._stop.set()
        for t in self._threads:
            t.join(self.client_timeout + 10)
        self._threads.clear()
        self._stop.clear()
        return list(self.outcomes)

    # --- results -------------------------------------------------------------------------------

    def attach(self, *envoys: Envoy, timeout: float = 10.0) -> list[Outcome]:
        """Fill each outcome's access log entry (from any of `envoys`: a hot restart writes two
        logs). An outcome whose request reached Envoy but was not yet logged is waited for; one
        with no entry after `timeout` keeps entry None."""
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, dict] = {}
            for envoy in envoys:
                found.update(envoy.entries_by_user_agent())
            for o in self.outcomes:
                o.entry = found.get(o.user_agent, o.entry)
            missing = [o for o in self.outcomes if o.entry is None]
            if not missing or time.monotonic() > deadline:
                return list(self.outcomes)
            time.sleep(0.1)

    @staticmethod
    def logged(outcome: Outcome, envoy: Envoy, timeout: float = 5.0) -> Outcome:
        """`outcome` with its access log entry (waits for Envoy to flush it)."""
        outcome.entry = wait_until(
            lambda: envoy.entries_by_user_agent().get(outcome.user_agent),
            timeout,
            f"access log entry of {outcome.user_agent}",
            interval=0.02,
        )
        return outcome

    def since(self, started: float) -> list[Outcome]:
        """The outcomes of requests started at or after `started` (time.monotonic())."""
        return [o for o in self.outcomes if o.started >= started]


def worker_per_user(outcomes: Iterable[Outcome], workers: dict[str, str]) -> dict[str, set[str]]:
    """{user ID: the set of workers ("sync-N") its answered requests were routed to}."""
    seen: dict[str, set[str]] = {}
    for o in outcomes:
        if o.upstream_host is not None:
            seen.setdefault(o.device.user_id, set()).add(
                workers.get(o.upstream_host, o.upstream_host)
            )
    return seen


def assert_answered_in_time(outcomes: Iterable[Outcome], limit_s: float) -> None:
    """Every request got a 200 within `limit_s`, and Envoy logged it."""
    outcomes = list(outcomes)
    assert outcomes, "no requests were made"
    failed = [(o.status, o.error[:120]) for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} syncs failed: {failed[:5]}"
    slow = sorted((round(o.elapsed, 2) for o in outcomes if o.elapsed > limit_s), reverse=True)
    assert not slow, f"{len(slow)} syncs took longer than {limit_s}s: {slow[:10]}"
    unlogged = [o.user_agent for o in outcomes if o.entry is None]
    assert not unlogged, f"{len(unlogged)} requests missing from the access log"


def place_users(envoy: Envoy, users, rounds: int = 2, threads: int = 8) -> dict[str, str]:
    """Sync every device of `users` `rounds` times through `envoy` (whoami healthy, so each
    token is resolved and cached); {user ID: its one worker}. Fails if a user is split."""
    load = SyncLoad(envoy.port, [d for u in users for d in u.devices])
    for _ in range(rounds):
        load.run_round(threads)
    outcomes = load.attach(envoy)
    assert_answered_in_time(outcomes, 60)
    placed = worker_per_user(outcomes, envoy.workers)
    split = {u: w for u, w in placed.items() if len(w) != 1}
    assert not split, f"users split over workers: {split}"
    by_user = {o.device.user_id: o.routing_key for o in outcomes}
    assert all(k == u for u, k in by_user.items()), "a user was not routed by its user ID"
    return {u: w.pop() for u, w in placed.items()}


def record_figures(test: str, **figures) -> None:
    """Append one test's measured figures to .e2e/figures.jsonl (and print them): the numbers
    docs/reliability.md quotes its figures from these lines."""
    E2E_DIR.mkdir(exist_ok=True)
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    with (E2E_DIR / "figures.jsonl").open("a") as f:
        f.write(line + "\n")
    print(f"figures: {line}")


# Envoy's RESPONSE_CODE_DETAILS when it answers for an upstream that failed (connect refused,
# connection reset, no healthy host): the upstream's fault, not the filter's.
_UPSTREAM_FAILURE_DETAILS = ("upstream_reset_before_response_started", "no_healthy_upstream")


def is_upstream_failure(o: Outcome) -> bool:
    """Envoy's own 503 for a dead upstream (as opposed to anything the filter did)."""
    return (
        o.status == 503
        and o.entry is not None
        and str(o.entry.get("details", "")).startswith(_UPSTREAM_FAILURE_DETAILS)
    )


def user_routing_back(outcomes: Iterable[Outcome], devices: Iterable[Device], since: float):
    """Seconds from `since` (time.monotonic()) until every device's syncs were routed by its
    user ID for good: for each device, the start of its first request after which none of its
    requests used anything else; the slowest device. None if some device is not back by the
    end of `outcomes`."""
    outcomes = sorted((o for o in outcomes if o.started >= since), key=lambda o: o.started)
    slowest = 0.0
    for device in devices:
        mine = [o for o in outcomes if o.device.device_id == device.device_id]
        if not mine or mine[-1].routing_key != device.user_id:
            return None
        first_good = len(mine) - 1
        while first_good > 0 and mine[first_good - 1].routing_key == device.user_id:
            first_good -= 1
        slowest = max(slowest, mine[first_good].started - since)
    return slowest
