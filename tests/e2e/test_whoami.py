"""The whoami callout through the real Envoy: cache, invalid tokens, whoami unreachable."""

from __future__ import annotations

import re
import time
from typing import ClassVar

import pytest

from msrtest.env import free_ports
from msrtest.envoy import Envoy
from msrtest.httpclient import http_request

FALLBACK_KEY = re.compile(r"^~[0-9a-f]{16}$")
BAD_TOKEN = "syt_bm9ib2R5_NotARealTokenAtAll_0abcde"


class Counters:
    """Deltas of Envoy stats between two reads (filter counters from /stats/prometheus)."""

    FILTER: ClassVar[list[str]] = [
        "requests",
        "no_token",
        "cache_hits",
        "cache_misses",
        "negative_hits",
        "backoff_hits",
        "whoami_ok",
        "whoami_denied",
        "whoami_failed",
        "fallbacks",
        "rejected",
        "cache_write_failures",
        "refreshes",
        "coalesced",
        "shed",
    ]
    # The filter counts in VM memory and flushes to Envoy on its one-second tick.
    FLUSH_S = 1.5

    def __init__(self, envoy: Envoy):
        self.envoy = envoy
        self.before = self.read()

    def read(self) -> dict[str, float]:
        time.sleep(self.FLUSH_S)
        prom = self.envoy.prometheus()
        values = {n: prom[f"matrix_sync_router_{n}"] for n in self.FILTER}
        values["whoami_calls"] = self.envoy.stats()["cluster.synapse_whoami.upstream_rq_total"]
        return values

    def delta(self) -> dict[str, float]:
        after = self.read()
        return {k: after[k] - self.before[k] for k in after}


def test_filter_counters_are_exported(envoy):
    prom = envoy.prometheus()
    missing = [n for n in Counters.FILTER if f"matrix_sync_router_{n}" not in prom]
    assert not missing, f"not in /stats/prometheus: {missing}"


def test_one_whoami_per_distinct_token(envoy, make_user):
    counters = Counters(envoy)
    users = [make_user("cache") for _ in range(2)]
    devices = [d for u in users for d in u.devices]
    syncs_per_device = 4
    for device in devices:  # first request of each token: one whoami each
        assert envoy.sync(device.token).status == 200
    for _ in range(syncs_per_device - 1):
        for device in devices:  # the rest, header and query mixed: cache hits
            assert envoy.sync(device.token, via="query").status == 200
            assert envoy.sync(device.token).status == 200
    d = counters.delta()
    n_tokens, n_requests = len(devices), len(devices) * (1 + 2 * (syncs_per_device - 1))
    assert d["whoami_calls"] == n_tokens, d
    assert d["whoami_ok"] == n_tokens, d
    assert d["cache_misses"] == n_tokens, d
    assert d["cache_hits"] == n_requests - n_tokens, d
    assert d["requests"] == n_requests, d
    assert d["fallbacks"] == 0 and d["whoami_failed"] == 0, d


def test_bad_token_gets_synapses_own_401(envoy):
    counters = Counters(envoy)
    for _ in range(3):
        r = envoy.sync(BAD_TOKEN)
        assert r.status == 401
        assert r.json()["errcode"] == "M_UNKNOWN_TOKEN", r.body[:200]
        entry = envoy.log_entry(r.request_id)
        assert entry["details"] == "via_upstream", "default config must forward, not reject"
        assert entry["upstream_host"] in envoy.workers
        assert FALLBACK_KEY.match(entry["user"] or ""), "expected the per-token fallback key"
    d = counters.delta()
    assert d["whoami_calls"] == 1 and d["whoami_denied"] == 1, d
    assert d["negative_hits"] == 2 and d["fallbacks"] == 3 and d["rejected"] == 0, d


@pytest.fixture(scope="module")
def rejecting_envoy(e2e_stack):
    return e2e_stack.add_envoy("reject", plugin_overrides={"reject_invalid_tokens": True})


def test_reject_invalid_tokens_answers_at_the_edge(rejecting_envoy, placed_users, e2e_stack):
    envoy = rejecting_envoy
    counters = Counters(envoy)
    r = envoy.sync(BAD_TOKEN)
    assert r.status == 401
    body = r.json()
    assert body["errcode"] == "M_UNKNOWN_TOKEN", body
    direct = http_request(
        e2e_stack.synapse.main_port,
        "GET",
        "/_matrix/client/v3/account/whoami",
        [("Authorization", f"Bearer {BAD_TOKEN}")],
    )
    assert (r.status, body) == (direct.status, direct.json()), "not whoami's own status and body"
    entry = envoy.log_entry(r.request_id)
    assert entry["upstream_host"] is None, f"a worker was asked: {entry}"
    assert entry["details"] != "via_upstream", entry
    d = counters.delta()
    assert d["rejected"] == 1 and d["whoami_denied"] == 1 and d["whoami_calls"] == 1, d
    # A valid token is still routed to its user's worker.
    users, _ = placed_users
    r = envoy.sync(users[0].devices[0].token)
    assert r.status == 200
    assert envoy.log_entry(r.request_id)["user"] == users[0].user_id


@pytest.fixture(scope="module")
def blind_envoy(e2e_stack):
    """An Envoy whose synapse_whoami cluster points at a port where nothing listens."""
    (closed_port,) = free_ports(1)
    return e2e_stack.add_envoy("no-whoami", whoami_port=closed_port)


def test_whoami_unreachable_fails_open_and_keeps_devices_together(blind_envoy, make_user):
    envoy = blind_envoy
    counters = Counters(envoy)
    user = make_user("blind")
    per_device: dict[str, set[str]] = {}
    keys: dict[str, set[str]] = {}
    for _ in range(4):
        for device in user.devices:
            r = envoy.sync(device.token)
            assert r.status == 200, r.body[:200]  # Synapse's real answer
            assert r.json()["next_batch"]
            entry = envoy.log_entry(r.request_id)
            per_device.setdefault(device.device_id, set()).add(envoy.worker_of(r))
            keys.setdefault(device.device_id, set()).add(entry["user"])
    for device_id, workers in per_device.items():
        assert len(workers) == 1, f"one device's requests spread: {per_device}"
        (key,) = keys[device_id]
        assert FALLBACK_KEY.match(key), "expected the per-token fallback key"
    assert len({k for ks in keys.values() for k in ks}) == len(user.devices)
    d = counters.delta()
    n_requests = 4 * len(user.devices)
    assert d["whoami_failed"] >= len(user.devices), d
    assert d["fallbacks"] == n_requests, d
    assert d["whoami_ok"] == 0, d
    # Back-off: after the first failure of each token no new callout for failure_backoff_s.
    assert d["backoff_hits"] == n_requests - len(user.devices), d
