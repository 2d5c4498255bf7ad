"""A whoami server on 127.0.0.1 whose answers the test breaks on purpose.

It plays only Synapse's `GET /_matrix/client/v3/account/whoami` (Envoy's `synapse_whoami` cluster
points at it); the sync workers stay real Synapse listeners. In mode "proxy" it forwards the
call to the real Synapse and returns its real answer; every other mode is one fault from issue 9.
Faults that carry a user ID (10 MB body, CR/LF/NUL) start from the real answer, so the forged
answer names the token's real user — the filter must still refuse it.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import stack

TRUNCATED = b'{"user_id": "@someone:example.te'
HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>oops</body></html>"


class FaultWhoami:
    """Threaded HTTP/1.1 server; set `mode` (see MODES) at any time."""

    # mode → what the server answers (the filter's view of each: README "whoami answers").
    MODES = {
        "proxy": "the real Synapse answer",
        "401": "401 M_UNKNOWN_TOKEN for a valid token (negative answer, negative_ttl_s)",
        "500": "500 M_UNKNOWN",
        "429": "429 M_LIMIT_EXCEEDED with Retry-After: 3600",
        "html": "200 text/html page",
        "truncated_json": "200 with a JSON document cut short (complete HTTP message)",
        "cut_body": "200, Content-Length 4096, 30 bytes sent, connection closed",
        "huge_body": "200 with the real user_id padded to a 10 MB JSON body",
        "not_mxid": 'user_id "alice" (no sigil, no server name)',
        "crlf": "user_id with CR LF and a header after it",
        "nul": "user_id with a NUL inside",
        "slow_under": "the real answer after `slow_under_s`",
        "slow_over": "the real answer after `slow_over_s`",
        # Not a fault: a user per token without Synapse, to measure placement over many keys.
        "synthetic": "200 with user_id @k<16 hex of SHA-256(token)>:example.test",
    }

    def __init__(self, synapse_port: int, slow_under_s: float = 0.5, slow_over_s: float = 2.0):
        self.synapse_port = synapse_port
        self.slow_under_s = slow_under_s
        self.slow_over_s = slow_over_s
        self.mode = "proxy"
        self.calls: list[tuple[str, str]] = []  # (mode, path) of every request received
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's connection pool expects

            def do_GET(self):  # noqa: N802 - http.server API
                server._handle(self)

            def log_message(self, *args):  # quiet
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # Envoy opens many callout connections at once
            daemon_threads = True

        self.httpd = Server((stack.HOST, 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "FaultWhoami":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls_in(self, mode: str) -> int:
        with self._lock:
            return sum(m == mode for m, _ in self.calls)

    # --- answers -------------------------------------------------------------------------------

    def _real(self, h: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        """Ask the real Synapse with the caller's Authorization (and client headers)."""
        forward = [
            (name, h.headers[name])
            for name in ("Authorization", "User-Agent", "X-Forwarded-For")
            if h.headers[name] is not None
        ]
        r = stack.http_request(self.synapse_port, "GET", h.path, forward, timeout=10)
        return r.status, r.body

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        mode = self.mode
        with self._lock:
            self.calls.append((mode, h.path))
        try:
            self._answer(h, mode)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the filter gave up on this call (slow_over): nothing to answer

    def _answer(self, h: http.server.BaseHTTPRequestHandler, mode: str) -> None:
        if mode in ("proxy", "slow_under", "slow_over"):
            time.sleep({"slow_under": self.slow_under_s, "slow_over": self.slow_over_s}.get(mode, 0))
            status, body = self._real(h)
            return self._send(h, status, body)
        if mode == "401":
            return self._send(h, 401, _error("M_UNKNOWN_TOKEN", "Unknown access token"))
        if mode == "synthetic":
            token = (h.headers["Authorization"] or "").partition(" ")[2]
            user_id = f"@k{hashlib.sha256(token.encode()).hexdigest()[:16]}:{stack.SERVER_NAME}"
            return self._send(h, 200, json.dumps({"user_id": user_id}).encode())
        if mode == "500":
            return self._send(h, 500, _error("M_UNKNOWN", "Internal server error"))
        if mode == "429":
            body = json.dumps(
                {"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": 3600000}
            ).encode()
            return self._send(h, 429, body, [("Retry-After", "3600")])
        if mode == "html":
            return self._send(h, 200, HTML, content_type="text/html")
        if mode == "truncated_json":
            return self._send(h, 200, TRUNCATED)
        if mode == "cut_body":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "4096")
            h.end_headers()
            h.wfile.write(TRUNCATED)
            h.wfile.flush()
            h.close_connection = True
            return None
        status, body = self._real(h)
        if status != 200:
            return self._send(h, status, body)
        answer = json.loads(body)
        user_id = answer["user_id"]
        if mode == "huge_body":
            answer["padding"] = "x" * (10 * 1024 * 1024)
        elif mode == "not_mxid":
            answer["user_id"] = user_id[1:].split(":", 1)[0]
        elif mode == "crlf":
            answer["user_id"] = f"{user_id}\r\nx-injected: 1"
        elif mode == "nul":
            answer["user_id"] = f"{user_id}\x00"
        else:
            raise ValueError(f"unknown mode {mode!r}")
        return self._send(h, 200, json.dumps(answer).encode())

    @staticmethod
    def _send(h, status: int, body: bytes, headers=(), content_type="application/json") -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)


def _error(errcode: str, error: str) -> bytes:
    return json.dumps({"errcode": errcode, "error": error}).encode()
