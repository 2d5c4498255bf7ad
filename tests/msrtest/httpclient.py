"""The tests' HTTP client: one request on a fresh connection, header names sent exactly as given."""

from __future__ import annotations

import dataclasses
import http.client
import json
from collections.abc import Iterable
from typing import Any

from msrtest.env import HOST


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = 60.0,
) -> Response:
    """One request on a fresh connection; header names are sent exactly as given."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{HOST}:{port}")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Response(resp.status, merged, data)
    finally:
        conn.close()


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")
