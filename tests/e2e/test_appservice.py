"""Appservice tokens through the real Envoy: whoami answers with the appservice's sender, so its
syncs are pinned to the sender's worker; masquerading (`?user_id=`) is resolved by a whoami call
with the same `user_id` and routed by the masqueraded user, and gets Synapse's real answer.

Synapse itself refuses /sync for the sender user (synapse/handlers/sync.py raises
NotImplementedError, "We no longer support AS users using /sync directly": a 500 M_UNKNOWN). The
test asserts that answer comes from the sync worker, i.e. routing worked and the status is
Synapse's own."""

from __future__ import annotations

import secrets

from msrtest.matrix import SYNC_PATH, WHOAMI_PATH
from msrtest.spread import samples_for_spread


def test_appservice_token_is_routed_by_its_sender(envoy, e2e_stack):
    synapse = e2e_stack.synapse
    appservice = synapse.appservice
    bridged = synapse.register_appservice_user(f"{appservice.user_prefix}x")
    user_agent = f"e2e-as-{secrets.token_hex(6)}"
    headers = [("User-Agent", user_agent)]
    calls_before = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"]

    workers = []
    for _ in range(3):
        r = envoy.sync(appservice.as_token, extra_headers=headers)
        assert r.status == 500, r.body[:200]
        assert r.json()["errcode"] == "M_UNKNOWN", r.body[:200]
        entry = envoy.log_entry(r.request_id)
        assert entry["user"] == appservice.sender and entry["details"] == "via_upstream", entry
        workers.append(envoy.worker_of(r))
    assert len(set(workers)) == 1, f"the appservice's syncs spread over workers: {workers}"

    for _ in range(2):
        r = envoy.sync(
            appservice.as_token, extra_headers=headers, query={"timeout": "0", "user_id": bridged}
        )
        assert r.status == 200, r.body[:200]
        assert r.json()["next_batch"]
        entry = envoy.log_entry(r.request_id)
        assert entry["user"] == bridged, "masquerading is routed by the masqueraded user"

    calls = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"] - calls_before
    assert calls == 2, f"expected one whoami for the token and one for the masquerade: {calls}"
    # Synapse served the first syncs as the sender and the others as the masqueraded user; the
    # filter's two whoami calls were answered as the sender and as the masqueraded user.
    seen = synapse.wait_for_processed(user_agent, SYNC_PATH, count=5)
    syncs = [p for p in seen if p.path == SYNC_PATH]
    assert [(p.requester, p.status) for p in syncs] == [(appservice.sender, "500")] * 3 + [
        (bridged, "200")
    ] * 2, seen
    assert all(p.port in synapse.worker_ports for p in syncs), seen
    whoamis = sorted((p.requester, p.status) for p in seen if p.path == WHOAMI_PATH)
    assert whoamis == sorted([(appservice.sender, "200"), (bridged, "200")]), seen


def test_each_masqueraded_user_sticks_to_its_own_worker(envoy, e2e_stack):
    """Bridged users of one appservice token are spread over the workers like real users, and
    each one's requests stay on one worker."""
    synapse = e2e_stack.synapse
    appservice = synapse.appservice
    workers: dict[str, set[str]] = {}
    for i in range(samples_for_spread()):
        bridged = synapse.register_appservice_user(f"{appservice.user_prefix}spread{i}")
        for _ in range(2):
            r = envoy.sync(appservice.as_token, query={"timeout": "0", "user_id": bridged})
            assert r.status == 200, r.body[:200]
            assert envoy.log_entry(r.request_id)["user"] == bridged
            workers.setdefault(bridged, set()).add(envoy.worker_of(r))
    assert all(len(w) == 1 for w in workers.values()), workers
    assert len({w for ws in workers.values() for w in ws}) >= 2, workers
