"""MSC4186's stable sliding sync, `POST /_matrix/client/v4/sync`, through envoy.yaml as shipped:
routed to the sync workers by user, like every other sync. Synapse 1.163.2 does not serve the
path yet (a sync worker answers 404 as the main process would), so what is checked is where the
request went and with which key, from Envoy's access log."""

from __future__ import annotations

import json

V4_SYNC_PATH = "/_matrix/client/v4/sync"


def _v4_sync(envoy, token: str, conn_id: str):
    body = json.dumps({"conn_id": conn_id, "lists": {}, "timeout": 0}).encode()
    headers = [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")]
    return envoy.request("POST", V4_SYNC_PATH, headers, body)


def test_v4_sync_of_two_devices_goes_to_the_users_worker(placed_users, envoy):
    users, _ = placed_users
    user = users[3]
    assert not user.worker.startswith("several"), user.worker
    for n, device in enumerate(user.devices[:2]):
        r = _v4_sync(envoy, device.token, f"conn-{n}")
        entry = envoy.log_entry(r.request_id)
        # Synapse's own answer from a sync worker (404 M_UNRECOGNIZED while it does not serve
        # the endpoint), not Envoy's catch-all route.
        assert entry["route"] == "sliding_sync", entry
        assert entry["cluster"] == "synapse_sync_workers", entry
        assert entry["details"] == "via_upstream", (r.status, entry)
        assert entry["user"] == user.user_id, entry
        assert entry["sync_kind"] == "sliding", entry
        assert envoy.worker_of(r) == user.worker, (device.device_id, entry)


def test_v4_sync_neighbours_are_not_sync_requests(placed_users, envoy):
    """A path next to the v4 endpoint is no sync request: Envoy's catch-all, without a key."""
    users, _ = placed_users
    token = users[3].devices[0].token
    for path in (f"{V4_SYNC_PATH}/", "/_matrix/client/v4/events"):
        r = envoy.request("POST", path, [("Authorization", f"Bearer {token}")], b"{}")
        entry = envoy.log_entry(r.request_id)
        assert entry["cluster"] not in ("synapse_sync_workers", "synapse_initial_sync"), entry
        assert entry["user"] is None, entry
