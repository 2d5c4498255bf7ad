"""Appservice tokens through the real Envoy: whoami answers with the appservice's sender, so its
syncs are pinned to the sender's worker; masquerading (`?user_id=`) is routed by the sender too
(README, "Known limits") and still gets Synapse's real answer for the masqueraded user.

Synapse itself refuses /sync for the sender user (synapse/handlers/sync.py raises
NotImplementedError, "We no longer support AS users using /sync directly": a 500 M_UNKNOWN). The
test asserts that answer comes from the sync worker, i.e. routing worked and the status is
Synapse's own."""

from __future__ import annotations

import secrets

import stack


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

    r = envoy.sync(
        appservice.as_token, extra_headers=headers, query={"timeout": "0", "user_id": bridged}
    )
    assert r.status == 200, r.body[:200]
    assert r.json()["next_batch"]
    entry = envoy.log_entry(r.request_id)
    assert entry["user"] == appservice.sender, "masquerading is routed by the sender"
    assert envoy.worker_of(r) == workers[0]

    calls = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"] - calls_before
    assert calls == 1, f"expected one whoami callout for the appservice token, saw {calls}"
    # Synapse served the first syncs as the sender and the last one as the masqueraded user, all
    # on one worker listener; the one whoami (the filter's, without ?user_id=) as the sender.
    seen = synapse.wait_for_processed(user_agent, stack.SYNC_PATH, count=4)
    syncs = [p for p in seen if p.path == stack.SYNC_PATH]
    assert [(p.requester, p.status) for p in syncs] == [(appservice.sender, "500")] * 3 + [
        (bridged, "200")
    ], seen
    assert len({p.port for p in syncs}) == 1 and syncs[0].port in synapse.worker_ports, seen
    whoamis = [(p.requester, p.status) for p in seen if p.path == stack.WHOAMI_PATH]
    assert whoamis == [(appservice.sender, "200")], seen
