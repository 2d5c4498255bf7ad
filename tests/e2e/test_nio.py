"""A real Matrix client (matrix-nio) logging in and syncing through Envoy."""

from __future__ import annotations

import asyncio

import nio


async def _login_and_sync(url: str, user_id: str, password: str) -> list[str]:
    """Log in a new device with nio, sync twice; returns the x-request-id of each sync."""
    client = nio.AsyncClient(url, user_id, store_path=None)
    try:
        login = await client.login(password, device_name="nio e2e")
        assert isinstance(login, nio.LoginResponse), login
        request_ids = []
        for _ in range(2):
            sync = await client.sync(timeout=0, full_state=not request_ids)
            assert isinstance(sync, nio.SyncResponse), sync
            assert sync.next_batch
            request_ids.append(sync.transport_response.headers["x-request-id"])
        await client.logout()
        return request_ids
    finally:
        await client.close()


def test_nio_login_and_sync_land_on_the_users_worker(placed_users, envoy):
    users, _ = placed_users
    user = users[3]
    request_ids = asyncio.run(_login_and_sync(envoy.url, user.user_id, user.password))
    for request_id in request_ids:
        entry = envoy.log_entry(request_id)
        assert entry["route"] in ("sync", "sync_initial") and entry["status"] == 200, entry
        assert entry["user"] == user.user_id
        assert envoy.workers[entry["upstream_host"]] == user.worker, (
            "nio's sync went to another worker than the user's other devices"
        )
