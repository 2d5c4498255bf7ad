"""A recording TCP relay between a proxy and one Synapse worker.

Neither Synapse nor nginx can log the request headers a worker actually received, yet what the
worker receives (exactly one X-User-Identifier, the filter's) is the point of the nginx tests. A
HeaderTap sits on its own port in front of a real Synapse listener, forwards every byte both
ways unchanged, and records the head (request line and headers, names as sent) of each HTTP/1.1
request on the way in. It only parses request framing (Content-Length); anything else it cannot
follow (a chunked request body) is recorded as an error and relayed raw from then on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading

HOST = "127.0.0.1"


@dataclasses.dataclass
class RequestHead:
    request_line: str
    headers: list[tuple[str, str]]  # in order, names exactly as sent

    def values(self, name: str) -> list[str]:
        """Every value of header `name`, matched case-insensitively (as HTTP does)."""
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self, name: str) -> list[str]:
        """The spellings under which header `name` arrived."""
        return [n for n, _ in self.headers if n.lower() == name.lower()]


class HeaderTap:
    """Listens on 127.0.0.1:<port> and relays to 127.0.0.1:<target_port>, recording heads."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._heads: list[RequestHead] = []
        self.errors: list[str] = []
        self._closed = False
        threading.Thread(target=self._accept, name=f"tap:{self.port}", daemon=True).start()

    # --- reading what was recorded ------------------------------------------------------------

    def heads(self) -> list[RequestHead]:
        with self._lock:
            return list(self._heads)

    def find(self, header: str, value: str) -> list[RequestHead]:
        """The recorded requests carrying `header: value` (e.g. the test's X-Test-Id)."""
        return [h for h in self.heads() if value in h.values(header)]

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    # --- relaying -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self.target_port), timeout=10)
            upstream.settimeout(None)
        except OSError as exc:
            self._error(f"connect to {self.target_port}: {exc}")
            client.close()
            return
        threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()
        try:
            self._relay_requests(client, upstream)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _relay_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client → upstream: record each request head, then pass head and body on."""
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = client.recv(65536)
                if not data:
                    return
                buf += data
            raw, buf = buf.split(b"\r\n\r\n", 1)
            head = self._parse(raw)
            with self._lock:
                self._heads.append(head)
            upstream.sendall(raw + b"\r\n\r\n")
            if any(v.lower() == "chunked" for v in head.values("transfer-encoding")):
                self._error(f"chunked request body after {head.request_line!r}: relayed raw")
                upstream.sendall(buf)
                self._pump(client, upstream)
                return
            length = int((head.values("content-length") or ["0"])[0])
            body, buf = buf[:length], buf[length:]
            upstream.sendall(body)
            remaining = length - len(body)
            while remaining > 0:
                data = client.recv(min(65536, remaining))
                if not data:
                    return
                upstream.sendall(data)
                remaining -= len(data)

    @staticmethod
    def _parse(raw: bytes) -> RequestHead:
        lines = raw.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        return RequestHead(lines[0], headers)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        """Copies src to dst until src ends, then ends dst's writing side."""
        with contextlib.suppress(OSError):
            for data in iter(lambda: src.recv(65536), b""):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
