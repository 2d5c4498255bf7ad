"""The whoami callout carries the client's User-Agent and address, so Synapse records the real
client for it: the same address and user agent it records for the sync request itself.

Synapse (listeners with `x_forwarded: true`) records the FIRST X-Forwarded-For entry. Envoy
(`use_remote_address: true`) appends the downstream address to the client's X-Forwarded-For — for
a loopback client, as here, Envoy's own non-loopback address instead — and the filter appends the
source address to that if it is not already last. So Synapse records the address the client sent
if it sent one, else the address Envoy appended; for the whoami callout and for the sync alike.
"""

from __future__ import annotations

import ipaddress
import secrets

import pytest

from msrtest.matrix import SYNC_PATH, WHOAMI_PATH


@pytest.mark.parametrize("client_sends_xff", [True, False], ids=["client-xff", "no-xff"])
def test_whoami_callout_records_the_clients_address_and_user_agent(
    envoy, make_user, e2e_stack, client_sends_xff
):
    synapse = e2e_stack.synapse
    (device,) = make_user("xff", n_devices=1).devices  # a new login: its token is not cached
    user_agent = f"e2e-ua-{secrets.token_hex(6)}"
    headers = [("User-Agent", user_agent)]
    client_ip = f"203.0.113.{secrets.randbelow(254) + 1}"
    if client_sends_xff:
        headers.append(("X-Forwarded-For", client_ip))
    calls_before = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"]

    r = envoy.sync(device.token, extra_headers=headers)

    assert r.status == 200, r.body[:200]
    entry = envoy.log_entry(r.request_id)
    assert entry["user"] == device.user_id and entry["user_agent"] == user_agent, entry
    calls = envoy.stats()["cluster.synapse_whoami.upstream_rq_total"] - calls_before
    assert calls == 1, f"expected one whoami callout (a cache miss), saw {calls}"

    seen = synapse.wait_for_processed(user_agent, SYNC_PATH)
    by_path = {p.path: p for p in seen}
    assert len(seen) == 2 and set(by_path) == {WHOAMI_PATH, SYNC_PATH}, seen
    whoami, sync = by_path[WHOAMI_PATH], by_path[SYNC_PATH]
    assert whoami.port == synapse.main_port and sync.port in synapse.worker_ports, seen
    assert (whoami.status, sync.status) == ("200", "200"), seen
    assert whoami.requester == sync.requester == device.user_id, seen
    if client_sends_xff:
        assert sync.client == client_ip, seen
    else:
        ipaddress.ip_address(sync.client)  # Envoy's appended address (not a client's claim)
    assert whoami.client == sync.client, f"whoami recorded another client than its sync: {seen}"
