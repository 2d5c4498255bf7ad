"""A client that sends two Authorization headers, through envoy.yaml as shipped. Envoy joins
them into one value (`Bearer A,Bearer B`) before the filter and the upstream see it; Synapse
answers such a value 401 M_MISSING_TOKEN ("Invalid Authorization header."; two separate headers
would be "Too many Authorization headers."). The filter asks whoami nothing for it and routes it
with the joined value's own fallback key, so the client gets Synapse's own error from a sync
worker, the same one each time. (nginx answers 400 before any filter runs: test_nginx_wasm.py
and the harness.)"""

from __future__ import annotations

from msrtest.matrix import FALLBACK_KEY, SYNC_PATH


def _twice(envoy, first: str, second: str):
    headers = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
    return envoy.request("GET", f"{SYNC_PATH}?timeout=0", headers)


def _whoami_calls(envoy) -> int:
    return envoy.stats().get("cluster.synapse_whoami.upstream_rq_total", 0)


def test_envoy_joins_repeated_authorization_and_synapse_refuses_the_joined_value(
    placed_users, envoy
):
    users, _ = placed_users
    user = users[5]
    a, b = (d.token for d in user.devices[:2])
    calls_before = _whoami_calls(envoy)
    seen = set()
    for _ in range(3):
        r = _twice(envoy, a, b)
        assert r.status == 401, r.body[:200]
        answer = r.json()
        assert answer["errcode"] == "M_MISSING_TOKEN", answer
        # One joined header reached Synapse, not two.
        assert answer["error"] == "Invalid Authorization header.", answer
        entry = envoy.log_entry(r.request_id)
        assert entry["cluster"] in ("synapse_sync_workers", "synapse_initial_sync"), entry
        assert FALLBACK_KEY.match(entry["user"] or ""), entry
        assert entry["key_source"] == "fallback", entry
        seen.add((entry["user"], envoy.worker_of(r)))
    assert len(seen) == 1, seen  # one key, one worker, every time
    # Both tokens are valid and known, yet nothing was asked of whoami for the joined value.
    assert _whoami_calls(envoy) == calls_before
    # Either token alone is the user's, on the user's worker.
    r = envoy.sync(a)
    assert r.status == 200 and envoy.log_entry(r.request_id)["user"] == user.user_id
