"""Proxy replicas agree on fallback keys when they share `fallback_key_secret`.

Two Envoys (replicas behind an L4 balancer, say) with one secret, and whoami unreachable from
both: a token nobody can resolve gets one fallback key, so one sync worker, whichever replica
its requests cross. A third Envoy without the secret keys its fallback keys per process, as
before: the same tokens get other keys there."""

from __future__ import annotations

import secrets

import pytest

from msrtest.env import free_ports
from msrtest.envoy import Envoy
from msrtest.matrix import FALLBACK_KEY
from msrtest.procs import wait_until
from msrtest.spread import samples_for_spread

SECRET = secrets.token_hex(16)


@pytest.fixture(scope="module")
def replicas(e2e_stack):
    """(a, b, solo): a and b share SECRET, solo has none; whoami is a port nobody listens on."""
    (closed,) = free_ports(1)
    fast = {"whoami_timeout_ms": 1000}
    shared = {**fast, "fallback_key_secret": SECRET}
    a = e2e_stack.add_envoy("replica-a", whoami_port=closed, plugin_overrides=shared)
    b = e2e_stack.add_envoy("replica-b", whoami_port=closed, plugin_overrides=shared)
    solo = e2e_stack.add_envoy("replica-solo", whoami_port=closed, plugin_overrides=fast)
    return a, b, solo


def _routed(envoy: Envoy, token: str) -> tuple[str, str]:
    """(fallback key, sync worker) of one sync with `token`."""
    r = envoy.sync(token)
    # The sync worker's own answer to a token it does not know.
    assert r.status == 401 and r.json()["errcode"] == "M_UNKNOWN_TOKEN", (r.status, r.body[:200])
    entry = envoy.log_entry(r.request_id)
    assert FALLBACK_KEY.match(entry["user"] or ""), entry
    assert entry["key_source"] == "fallback", entry
    return entry["user"], envoy.worker_of(r)


def test_replicas_sharing_the_secret_send_an_unresolved_token_to_one_worker(replicas):
    a, b, solo = replicas
    tokens = [f"unknown_{secrets.token_hex(16)}" for _ in range(samples_for_spread())]
    workers = set()
    for token in tokens:
        key_a, worker_a = _routed(a, token)
        key_b, worker_b = _routed(b, token)
        assert (key_b, worker_b) == (key_a, worker_a), token
        # Per process without the secret: another key (equal only with chance 2^-64).
        key_solo, _ = _routed(solo, token)
        assert key_solo != key_a
        workers.add(worker_a)
    # Keys differ per token (they are not one constant): the tokens spread over the workers.
    assert len(workers) >= 2, workers
    # whoami was down all along: callouts failed, none succeeded (counters flush each second).
    for envoy in (a, b):
        wait_until(
            lambda e=envoy: e.prometheus().get("matrix_sync_router_whoami_failed", 0) > 0,
            5,
            f"{envoy.name}: whoami failures counted",
        )
        assert envoy.prometheus().get("matrix_sync_router_whoami_ok", 0) == 0


def test_the_secret_reaches_no_log(replicas):
    a, b, _ = replicas
    for envoy in (a, b):
        for path in (envoy.access_log, envoy.log):
            assert SECRET not in path.read_text(errors="replace"), path
