"""Fault servers on 127.0.0.1: stand-ins the tests break on purpose.

- FaultWhoami (test_faults, test_remap): a whoami server whose answers the test breaks. It plays
only Synapse's `GET /_matrix/client/v3/account/whoami` (Envoy's `synapse_whoami` cluster points at
it); the sync workers stay real Synapse listeners. In mode "proxy" it forwards the
call to the real Synapse and returns its real answer; every other mode is one fault from issue 9.
Faults that carry a user ID (10 MB body, CR/LF/NUL) start from the real answer, so the forged
answer names the token's real user — the filter must still refuse it.
- SlowWhoami (test_coalescing): answers every whoami after a delay, counting the calls open at once.
- Relay (test_remap): a TCP relay to one Synapse listener that can be made to fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from msrtest.env import HOST
from msrtest.httpclient import http_request
from msrtest.matrix import SERVER_NAME

TRUNCATED = b'{"user_id": "@someone:example.te'
HTML = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>oops</body></html>"


class FaultWhoami:
    """Threaded HTTP/1.1 server; set `mode` (see MODES) at any time."""

    # mode → what the server answers (the filter's view: docs/architecture.md, "whoami answers").
    MODES: ClassVar[dict[str, str]] = {
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

            def do_GET(self):
                server._handle(self)

            def log_message(self, *args):  # quiet
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # Envoy opens many callout connections at once
            daemon_threads = True

        self.httpd = Server((HOST, 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FaultWhoami:
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
        r = http_request(self.synapse_port, "GET", h.path, forward, timeout=10)
        return r.status, r.body

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        mode = self.mode
        with self._lock:
            self.calls.append((mode, h.path))
        # A broken connection: the filter gave up on this call (slow_over), nothing to answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._answer(h, mode)

    def _answer(self, h: http.server.BaseHTTPRequestHandler, mode: str) -> None:
        if mode in ("proxy", "slow_under", "slow_over"):
            time.sleep(
                {"slow_under": self.slow_under_s, "slow_over": self.slow_over_s}.get(mode, 0)
            )
            status, body = self._real(h)
            return self._send(h, status, body)
        if mode == "401":
            return self._send(h, 401, _error("M_UNKNOWN_TOKEN", "Unknown access token"))
        if mode == "synthetic":
            token = (h.headers["Authorization"] or "").partition(" ")[2]
            user_id = f"@k{hashlib.sha256(token.encode()).hexdigest()[:16]}:{SERVER_NAME}"
            return self._send(h, 200, json.dumps({"user_id": user_id}).encode())
        if mode == "500":
            return self._send(h, 500, _error("M_UNKNOWN", "Internal server error"))
        if mode == "429":
            body = json.dumps(
                {
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too Many Requests",
                    "retry_after_ms": 3600000,
                }
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


class SlowWhoami:
    """whoami stand-in: answers `{"user_id": "@<token>:example.test"}` after `delay_s`, and records
    the peak number of calls open at once."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.open = 0
        self.peak = 0
        self.calls = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with outer.lock:
                    outer.open += 1
                    outer.calls += 1
                    outer.peak = max(outer.peak, outer.open)
                try:
                    time.sleep(outer.delay_s)
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    body = json.dumps({"user_id": f"@{token.lower()}:example.test"}).encode()
                finally:
                    # The call is over once its answer is on its way: the filter may start the
                    # next call the moment it has it, before this thread would get here again.
                    with outer.lock:
                        outer.open -= 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


SERVICE_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
    b"Connection: close\r\n\r\nfailing now\n"
)


class Relay:
    """A TCP relay from a port of its own to one Synapse listener, which can be made to fail."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.failing = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def fail(self) -> None:
        """From now on: 503 to every new connection, and the relayed ones are cut."""
        self.failing = True
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def recover(self) -> None:
        self.failing = False

    def close(self) -> None:
        self._stopped.set()
        self.fail()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.failing:
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(SERVICE_UNAVAILABLE)
                except OSError:
                    pass
            return
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=5)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((conn, upstream))
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
