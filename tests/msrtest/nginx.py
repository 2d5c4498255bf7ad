"""nginx built with Kong's ngx_wasm_module, running the repository's own nginx-wasm/nginx.conf.

`render_nginx_config` substitutes only the listen port, the upstream addresses and ports, the
whoami upstream, the .wasm path and the log/pid paths (and, where a test says so, plugin fields or
the debug headers uncommented), so the file an operator starts from is what runs. `Nginx` runs it
with each worker behind a HeaderTap (msrtest.tap), and reads which worker served a request and the
routing key nginx hashed on from the shipped JSON access log (correlated by the X-Request-Id nginx
echoes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from msrtest import proxyconf
from msrtest.env import HOST, free_ports
from msrtest.envoy import Envoy
from msrtest.httpclient import Response, http_request
from msrtest.matrix import SYNC_PATH
from msrtest.procs import Process, Service, StackError, wait_until
from msrtest.synapse import Synapse
from msrtest.tap import HeaderTap, RequestHead

NGINX_CONF = proxyconf.NGINX_CONF
FILTER = "matrix_sync_router"
USER_AGENT = "msr-nginx-wasm-e2e"  # the User-Agent of every request Nginx.traced() sends
READY_PATH = "/_matrix/client/versions"


def sub_one(pattern: str, repl, text: str, what: str, count: int = 1) -> str:
    """`text` with `pattern` (multi-line) replaced exactly `count` times, else a StackError: a
    change to nginx.conf that moves what a test edits fails loudly instead of testing nothing."""
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n != count:
        raise StackError(f"nginx-wasm/nginx.conf: expected {count} {what}, found {n}")
    return new


_DEBUG_HEADER = r"^(\s*)# (add_header (X-MSR-[\w-]+) (\S+) always;)$"


def debug_header_lines(text: str) -> list[tuple[str, str]]:
    """(name, value) of the commented-out debug add_header lines of nginx.conf."""
    return [(m[3], m[4]) for m in re.finditer(_DEBUG_HEADER, text, re.MULTILINE)]


def uncomment_debug_headers(text: str) -> str:
    """nginx.conf with its debug response headers switched on, as an operator would."""
    return sub_one(_DEBUG_HEADER, r"\1\2", text, "debug add_header lines", count=2)


def _upstream(text: str, name: str, ports: list[int]) -> str:
    """Point `upstream name { ... }` at 127.0.0.1:<port> servers, keeping the shipped server
    parameters (`resolve`, max_fails, ...) of its first server line."""

    def repl(m: re.Match) -> str:
        params = re.search(r"^\s*server \S+(.*);", m["body"], re.MULTILINE)[1]
        body = re.sub(r"^\s*server\s.*\n", "", m["body"], flags=re.MULTILINE)
        servers = "".join(f"        server {HOST}:{p}{params};\n" for p in ports)
        return f"{m['head']}{body}{servers}{m['tail']}"

    return sub_one(
        rf"(?P<head>upstream {name} \{{\n)(?P<body>(?:(?!\n    \}}).*\n)*?)(?P<tail>    \}})",
        repl,
        text,
        f"upstream {name}",
    )


def render_nginx_config(
    *,
    workdir: Path,
    wasm: Path,
    listen_port: int | None = None,
    main_port: int | None = None,
    worker_ports: list[int] | None = None,
    initial_sync_ports: list[int] | None = None,
    room_ports: list[int] | None = None,
    plugin_overrides: dict | None = None,
    drop_lines: tuple[str, ...] = (),
    debug_headers: bool = False,
    source: Path = NGINX_CONF,
) -> str:
    """The shipped nginx.conf with its paths substituted and, when given, its listen port, its
    upstream servers (as 127.0.0.1:<port>), the whoami upstream and plugin fields (in every
    proxy_wasm line). The initial-sync pool and the room workers get the sync workers' servers
    unless their own are given: with the same servers, `hash ... consistent` picks the same one
    for a key, so initial syncs then land where a deployment without that pool sends them.
    `drop_lines` removes lines (only for tests that show why a line is there); `debug_headers`
    uncomments the debug response headers."""
    text = source.read_text()
    for line in drop_lines:
        text = sub_one(rf"^\s*{re.escape(line)}\n", "", text, f"line {line!r}")
    if debug_headers:
        text = uncomment_debug_headers(text)
    preamble = [
        "daemon off;",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'error.log'} info;",
    ]
    if os.geteuid() == 0:
        preamble.append("user root;")  # workers must read the .e2e work directory
    text = "\n".join(preamble) + "\n" + text
    text = sub_one(
        rf"^(\s*module {FILTER} )\S+;", lambda m: f"{m[1]}{wasm};", text, "wasm module line"
    )
    text = sub_one(
        r"^(\s*access_log )\S+( matrix;)",
        lambda m: f"{m[1]}{workdir / 'access.log'}{m[2]}",
        text,
        "access_log line",
    )
    if worker_ports is not None:
        text = _upstream(text, "synapse_sync_workers", worker_ports)
        text = _upstream(text, "synapse_initial_sync_workers", initial_sync_ports or worker_ports)
        text = _upstream(text, "synapse_room_workers", room_ports or worker_ports)
    if main_port is not None:
        text = _upstream(text, "synapse_main", [main_port])
    if listen_port is not None:
        text = sub_one(
            r"^(\s*)listen \S+;",
            lambda m: f"{m[1]}listen {HOST}:{listen_port};",
            text,
            "listen",
        )

    def plugin(m: re.Match) -> str:
        conf = json.loads(m[2])
        if main_port is not None:
            conf["whoami_upstream"] = f"{HOST}:{main_port}"
        conf.update(plugin_overrides or {})
        return f"{m[1]}'{json.dumps(conf)}';"

    return sub_one(rf"^(\s*proxy_wasm {FILTER} )'(.*)';", plugin, text, "proxy_wasm lines", 2)


class Nginx(Service):
    """nginx running the substituted nginx.conf; each worker behind a HeaderTap.

    The sync workers are taps in front of Synapse's worker listeners. By default the initial-sync
    pool and the room workers are those same taps; `initial_sync_pool` / `room_pool` taps (in
    front of the same listeners, but at their own addresses) give them upstreams of their own,
    and `initial_sync_ports` / `sync_ports` point the initial-sync pool / the sync workers at
    exactly these ports, untapped (e.g. ports nothing listens on)."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        synapse: Synapse,
        wasm: Path,
        drop_lines: tuple[str, ...] = (),
        *,
        initial_sync_pool: int = 0,
        initial_sync_ports: list[int] | None = None,
        sync_ports: list[int] | None = None,
        room_pool: int = 0,
        debug_headers: bool = False,
        **overrides,
    ):
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.synapse = synapse
        (self.port,) = free_ports(1)
        listeners = synapse.worker_ports
        self.taps = [HeaderTap(p) for p in listeners] if sync_ports is None else []
        self.initial_taps = [
            HeaderTap(listeners[i % len(listeners)]) for i in range(initial_sync_pool)
        ]
        self.room_taps = [HeaderTap(listeners[i % len(listeners)]) for i in range(room_pool)]
        if initial_sync_ports is None and self.initial_taps:
            initial_sync_ports = [t.port for t in self.initial_taps]
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            render_nginx_config(
                workdir=self.dir,
                listen_port=self.port,
                main_port=synapse.main_port,
                worker_ports=[t.port for t in self.taps] if sync_ports is None else sync_ports,
                initial_sync_ports=initial_sync_ports,
                room_ports=[t.port for t in self.room_taps] or None,
                wasm=Path(wasm).resolve(),
                plugin_overrides=overrides or None,
                drop_lines=drop_lines,
                debug_headers=debug_headers,
            )
        )
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.workers = {
            f"{HOST}:{t.port}": f"{pool}-{i + 1}"
            for pool, taps in (
                ("sync", self.taps),
                ("initial", self.initial_taps),
                ("room", self.room_taps),
            )
            for i, t in enumerate(taps)
        }
        self._log_offset = 0
        self._log_partial = b""
        self._entries: dict[str, dict] = {}

    def argv(self) -> list[str]:
        return [self.binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.conf)]

    def start(self, timeout: float = 60.0) -> Nginx:
        self.access_log.touch()
        self.process = Process("nginx", self.argv(), self.dir / "nginx.out", self.dir)
        self.wait_for(
            lambda: self.request("GET", READY_PATH, timeout=2).status == 200,
            timeout,
            f"nginx proxying {READY_PATH} to Synapse",
            interval=0.2,
        )
        return self

    @property
    def all_taps(self) -> list[HeaderTap]:
        return self.taps + self.initial_taps + self.room_taps

    def stop(self) -> None:
        super().stop()
        for t in self.all_taps:
            t.close()

    def request(self, method: str, path: str, headers=(), body=None, timeout: float = 60.0):
        return http_request(self.port, method, path, headers, body, timeout)

    def sync(self, headers=(), query: str = "") -> tuple[Response, str]:
        """GET /sync?timeout=0 (an initial sync; `query` adds parameters) through nginx with
        exactly `headers` (plus the test's own X-Test-Id and User-Agent first); returns
        (response, test id)."""
        return self.traced("GET", f"{SYNC_PATH}?timeout=0{query}", headers)

    def traced(self, method: str, path: str, headers=(), body=None) -> tuple[Response, str]:
        """A request with the test's X-Test-Id and User-Agent first; returns (response, test id)."""
        test_id = secrets.token_hex(8)
        sent = [("X-Test-Id", test_id), ("User-Agent", USER_AGENT), *headers]
        return self.request(method, path, sent, body), test_id

    # The shipped access log is JSON lines with a request_id, like Envoy's: same reader.
    _read_access_log = Envoy._read_access_log
    log_entry = Envoy.log_entry
    log_entries = Envoy.log_entries
    login = Envoy.login  # password login through nginx's /_matrix/ location

    def served(self, response: Response) -> tuple[str, str]:
        """(worker name, routing key nginx hashed on) of one request, from the access log. The
        worker is the last upstream tried (`a, b : c` after retries and an error_page)."""
        entry = self.log_entry(response.request_id)
        last = re.split(r", | : ", entry["upstream"])[-1]
        return self.workers.get(last, last), entry["user"]

    def upstream_head(self, test_id: str, timeout: float = 10.0) -> RequestHead:
        """The request as the worker received it (exactly one must have arrived)."""

        def find():
            heads = [h for t in self.all_taps for h in t.find("X-Test-Id", test_id)]
            return heads or None

        heads = wait_until(find, timeout, f"request {test_id} at a worker", interval=0.02)
        assert len(heads) == 1, f"{test_id} reached the workers {len(heads)} times"
        return heads[0]

    def nginx_workers(self, responses) -> set[str]:
        """The nginx worker processes (pids) that served these responses."""
        return {self.log_entry(r.request_id)["pid"] for r in responses}
