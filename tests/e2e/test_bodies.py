"""Large request bodies stream through Envoy (no Envoy-side limit below Synapse's)."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize("mib", [3, 101])
def test_large_media_upload_passes_envoy(placed_users, envoy, mib):
    """3 MiB: above the 1 MiB buffer watermarks; 101 MiB: above the 100 MiB that a federation
    route may buffer. Synapse (max_upload_size 200M in the test) stores it and answers 200."""
    users, _ = placed_users
    token = users[0].devices[0].token
    body = os.urandom(1 << 20) * mib
    r = envoy.request(
        "POST",
        "/_matrix/media/v3/upload?filename=big.bin",
        [("Authorization", f"Bearer {token}"), ("Content-Type", "application/octet-stream")],
        body,
        timeout=120,
    )
    entry = envoy.log_entry(r.request_id)
    assert r.status == 200, (r.status, r.body[:300], entry)
    assert r.json()["content_uri"].startswith("mxc://")
    assert entry["route"] == "media" and entry["bytes_in"] == len(body)
