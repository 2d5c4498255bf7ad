"""The filter in a real nginx built with Kong's ngx_wasm_module, in front of the real e2e Synapse.

ngx_wasm_module is in no package registry, so the tests that run nginx need $NGINX_WASM_BIN to
name an nginx binary built with it (e.g. nginx 1.27.4 + ngx_wasm_module + wasmtime); without it
they are skipped with that reason. The offline checks of nginx-wasm/nginx.conf (first section)
always run.

nginx runs the repository's own nginx-wasm/nginx.conf with only the listen port, the upstream
addresses and ports, the whoami upstream, the .wasm path and the log/pid paths substituted, so
the file an operator starts from is what is tested. Which worker served a request, and the
routing key nginx hashed on, come from the shipped JSON access log (correlated by the
X-Request-Id nginx echoes); the headers each worker actually received are recorded by a HeaderTap
(tests/e2e/tap.py) between nginx and each Synapse worker listener.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import proxyconf
import stack
from conftest import DEVICES_PER_USER, WASM, samples_for_spread
from tap import HeaderTap, RequestHead

NGINX_BIN = os.environ.get("NGINX_WASM_BIN", "")
NGINX_CONF = proxyconf.NGINX_CONF
FILTER = "matrix_sync_router"
HEADER = "X-User-Identifier"
SKIP_REASON = (
    "NGINX_WASM_BIN not set: needs an nginx built with ngx_wasm_module, which is in no package "
    "registry"
)
USER_AGENT = "msr-nginx-wasm-e2e"
READY_PATH = "/_matrix/client/versions"


# --------------------------------------------------------------------------------------------
# offline: nginx-wasm/nginx.conf as shipped (no nginx needed)


@pytest.fixture(scope="module")
def shipped() -> proxyconf.NginxConf:
    return proxyconf.NginxConf.load()


def test_the_shipped_plugin_config_passes_the_schema_and_the_filter_parser(shipped):
    """The proxy_wasm JSON is accepted by the compiled filter (harness, ngx_wasm_module profile
    with exactly the shm_kv zones and `set` variables nginx.conf declares) and by the schema."""
    conf = shipped.plugin_config()
    assert proxyconf.schema_errors(json.loads(conf)) == []
    checked = proxyconf.filter_configure(WASM, conf, zones=shipped.shm_zones())
    assert checked.accepted, checked.output


def test_the_routing_key_is_one_nginx_variable_end_to_end(shipped):
    """What the filter writes, what `hash` uses and what the workers receive are one variable,
    declared at server level, and no location sets headers of its own (a location with any
    proxy_set_header would inherit none of the server's, X-User-Identifier included)."""
    variable = json.loads(shipped.plugin_config())["nginx_variable"]
    assert variable
    assert shipped.hash_variables() == [variable]
    assert shipped.header_variables(HEADER) == [variable]
    ((_, server),) = shipped.blocks("server")
    outside_locations = server
    for _, body in shipped.blocks("location"):
        assert "proxy_set_header" not in body
        outside_locations = outside_locations.replace(body, "")
    assert re.search(rf'^\s*set \${variable} "";', outside_locations, re.MULTILINE)
    assert re.search(rf"^\s*proxy_set_header {HEADER} \${variable};", outside_locations, re.MULTILINE)


def test_the_sync_location_is_the_filters_path_family(shipped):
    assert proxyconf.same_family_as_the_filter([shipped.sync_location_regex()]) == []
    assert "sync_paths" not in json.loads(shipped.plugin_config())  # the filter's defaults


def test_the_access_log_shows_worker_and_key_but_no_token(shipped):
    (fmt,) = re.findall(r"log_format matrix escape=json((?:\s*'[^']*')+);", shipped.code)
    for variable in ("$upstream_addr", "$msr_routing_key", "$request_id"):
        assert variable in fmt
    # The query string may carry access_token; Authorization carries the token.
    for forbidden in ("$request ", "$request\"", "$request_uri", "$args", "$query_string", "$arg_", "$http_authorization"):
        assert forbidden not in fmt, forbidden
    assert re.search(r"^\s*access_log \S+ matrix;", shipped.code, re.MULTILINE)


def test_upstreams_are_production_shaped(shipped):
    """Run-time DNS (`resolve` needs a `zone` and a resolver), keep-alive, long-poll timeouts,
    body limits for media and federation, no gzip."""
    code = shipped.code
    assert re.search(r"^\s*resolver \S+", code, re.MULTILINE)
    upstreams = shipped.blocks("upstream")
    assert {name for name, _ in upstreams} == {"synapse_sync_workers", "synapse_main"}
    for name, body in upstreams:
        assert re.search(r"^\s*zone \S+ \S+;", body, re.MULTILINE), name
        assert re.search(r"^\s*keepalive \d+;", body, re.MULTILINE), name
        servers = re.findall(r"^\s*server (\S+)(.*);", body, re.MULTILINE)
        assert servers and all(" resolve" in params for _, params in servers), name
    assert re.search(r"^\s*gzip off;", code, re.MULTILINE)
    (sync,) = [b for a, b in shipped.blocks("location") if "proxy_wasm" in b]
    assert int(re.search(r"proxy_read_timeout (\d+)s;", sync)[1]) >= 120
    (federation,) = [b for a, b in shipped.blocks("location") if a == "/_matrix/federation/"]
    assert int(re.search(r"client_max_body_size (\d+)m;", federation)[1]) >= 100
    assert re.search(r"^\s*client_max_body_size \d+m;", code, re.MULTILINE)


# Callbacks ngx_wasm_module 3bed2783 calls without checking that the module exports them (it
# checks only context_create, vm_start, configure and memory_allocate at load,
# src/common/proxy_wasm/ngx_proxy_wasm.c): a module without one crashes the nginx worker
# (signal 11 in ngx_wavm_instance_call_funcref, seen with gdb on the real build).
NGX_UNCHECKED_CALLBACKS = [
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_delete",
    "proxy_on_http_call_response",
]


def wasm_exports(path: Path) -> list[str]:
    """Exported function names of a .wasm module (bench/noop_wasm.py reads the sections)."""
    sys.path.insert(0, str(stack.REPO / "bench"))
    try:
        from noop_wasm import exported_functions
    finally:
        sys.path.pop(0)
    return list(exported_functions(path.read_bytes()))


def test_the_filter_exports_every_callback_ngx_wasm_module_calls_unchecked():
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing (run `just build`)")
    missing = [c for c in NGX_UNCHECKED_CALLBACKS if c not in wasm_exports(WASM)]
    if missing:
        pytest.xfail(
            f"the filter does not export {missing}: ngx_wasm_module calls them unchecked and the "
            "nginx worker segfaults on the first proxied response (src/ must export them)"
        )


# --------------------------------------------------------------------------------------------
# the real nginx


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    if not NGINX_BIN:
        pytest.skip(SKIP_REASON)
    if not os.access(NGINX_BIN, os.X_OK):
        pytest.fail(f"NGINX_WASM_BIN={NGINX_BIN} is not an executable")
    with tempfile.TemporaryDirectory() as d:  # does it know the `wasm {}` block?
        conf = Path(d) / "nginx.conf"
        conf.write_text(f"pid {d}/nginx.pid;\nevents {{}}\nwasm {{}}\n")
        proc = subprocess.run(
            [NGINX_BIN, "-t", "-p", d, "-e", str(Path(d) / "error.log"), "-c", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    if proc.returncode != 0:
        pytest.fail(
            f"NGINX_WASM_BIN={NGINX_BIN} was not built with ngx_wasm_module:\n{proc.stderr}"
        )
    return NGINX_BIN


def _sub_one(pattern: str, repl, text: str, what: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n != 1:
        raise stack.StackError(f"nginx-wasm/nginx.conf: expected exactly one {what}, found {n}")
    return new


def _upstream(text: str, name: str, ports: list[int]) -> str:
    """Point `upstream name { ... }` at 127.0.0.1:<port> servers, keeping the shipped server
    parameters (`resolve`, max_fails, ...) of its first server line."""

    def repl(m: re.Match) -> str:
        params = re.search(r"^\s*server \S+(.*);", m["body"], re.MULTILINE)[1]
        body = re.sub(r"^\s*server\s.*\n", "", m["body"], flags=re.MULTILINE)
        servers = "".join(f"        server {stack.HOST}:{p}{params};\n" for p in ports)
        return f"{m['head']}{body}{servers}{m['tail']}"

    return _sub_one(
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
    plugin_overrides: dict | None = None,
    drop_lines: tuple[str, ...] = (),
    source: Path = NGINX_CONF,
) -> str:
    """The shipped nginx.conf with its paths substituted and, when given, its listen port, its
    upstream servers (as 127.0.0.1:<port>), the whoami upstream and plugin fields. `drop_lines`
    removes lines (only for tests that show why a line is there)."""
    text = source.read_text()
    for line in drop_lines:
        text = _sub_one(rf"^\s*{re.escape(line)}\n", "", text, f"line {line!r}")
    preamble = [
        "daemon off;",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'error.log'} info;",
    ]
    if os.geteuid() == 0:
        preamble.append("user root;")  # workers must read the .e2e work directory
    text = "\n".join(preamble) + "\n" + text
    text = _sub_one(
        rf"^(\s*module {FILTER} )\S+;", lambda m: f"{m[1]}{wasm};", text, "wasm module line"
    )
    text = _sub_one(
        r"^(\s*access_log )\S+( matrix;)",
        lambda m: f"{m[1]}{workdir / 'access.log'}{m[2]}",
        text,
        "access_log line",
    )
    if worker_ports is not None:
        text = _upstream(text, "synapse_sync_workers", worker_ports)
    if main_port is not None:
        text = _upstream(text, "synapse_main", [main_port])
    if listen_port is not None:
        text = _sub_one(
            r"^(\s*)listen \S+;",
            lambda m: f"{m[1]}listen {stack.HOST}:{listen_port};",
            text,
            "listen",
        )

    def plugin(m: re.Match) -> str:
        conf = json.loads(m[2])
        if main_port is not None:
            conf["whoami_upstream"] = f"{stack.HOST}:{main_port}"
        conf.update(plugin_overrides or {})
        return f"{m[1]}'{json.dumps(conf)}';"

    return _sub_one(rf"^(\s*proxy_wasm {FILTER} )'(.*)';", plugin, text, "proxy_wasm line")


class Nginx(stack.Service):
    """nginx running the substituted nginx.conf; each sync worker behind a HeaderTap."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        synapse: stack.Synapse,
        wasm: Path,
        drop_lines: tuple[str, ...] = (),
        **overrides,
    ):
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.synapse = synapse
        (self.port,) = stack.free_ports(1)
        self.taps = [HeaderTap(p) for p in synapse.worker_ports]
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            render_nginx_config(
                workdir=self.dir,
                listen_port=self.port,
                main_port=synapse.main_port,
                worker_ports=[t.port for t in self.taps],
                wasm=Path(wasm).resolve(),
                plugin_overrides=overrides or None,
                drop_lines=drop_lines,
            )
        )
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.workers = {f"{stack.HOST}:{t.port}": f"sync-{i + 1}" for i, t in enumerate(self.taps)}
        self._log_offset = 0
        self._log_partial = b""
        self._entries: dict[str, dict] = {}

    def argv(self) -> list[str]:
        return [self.binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.conf)]

    def start(self, timeout: float = 60.0) -> "Nginx":
        self.access_log.touch()
        self.process = stack.Process("nginx", self.argv(), self.dir / "nginx.out", self.dir)
        self.wait_for(
            lambda: self.request("GET", READY_PATH, timeout=2).status == 200,
            timeout,
            f"nginx proxying {READY_PATH} to Synapse",
            interval=0.2,
        )
        return self

    def stop(self) -> None:
        super().stop()
        for t in self.taps:
            t.close()

    def request(self, method: str, path: str, headers=(), body=None, timeout: float = 60.0):
        return stack.http_request(self.port, method, path, headers, body, timeout)

    def sync(self, headers=()) -> tuple[stack.Response, str]:
        """GET /sync?timeout=0 through nginx with exactly `headers` (plus the test's own
        X-Test-Id and User-Agent first); returns (response, test id)."""
        test_id = secrets.token_hex(8)
        sent = [("X-Test-Id", test_id), ("User-Agent", USER_AGENT), *headers]
        return self.request("GET", f"{stack.SYNC_PATH}?timeout=0", sent), test_id

    # The shipped access log is JSON lines with a request_id, like Envoy's: same reader.
    _read_access_log = stack.Envoy._read_access_log
    log_entry = stack.Envoy.log_entry
    log_entries = stack.Envoy.log_entries
    login = stack.Envoy.login  # password login through nginx's /_matrix/ location

    def served(self, response: stack.Response) -> tuple[str, str]:
        """(worker name, routing key nginx hashed on) of one request, from the access log."""
        entry = self.log_entry(response.request_id)
        return self.workers.get(entry["upstream"], entry["upstream"]), entry["user"]

    def upstream_head(self, test_id: str, timeout: float = 10.0) -> RequestHead:
        """The request as the worker received it (exactly one must have arrived)."""

        def find():
            heads = [h for t in self.taps for h in t.find("X-Test-Id", test_id)]
            return heads or None

        heads = stack.wait_until(find, timeout, f"request {test_id} at a worker", interval=0.02)
        assert len(heads) == 1, f"{test_id} reached the workers {len(heads)} times"
        return heads[0]

    def nginx_workers(self, responses) -> set[str]:
        """The nginx worker processes (pids) that served these responses."""
        return {self.log_entry(r.request_id)["pid"] for r in responses}


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir(nginx_bin, request):
    stack.E2E_DIR.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="nginx-wasm-", dir=stack.E2E_DIR))
    yield d
    if request.session.testsfailed == 0 and not os.environ.get("MSR_E2E_KEEP"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"\nnginx-wasm e2e logs kept in {d}")


@contextlib.contextmanager
def running(service):
    try:
        yield service.start()
    finally:
        service.stop()


@pytest.fixture(scope="module")
def synapse(workdir):
    with running(stack.Synapse(workdir / "synapse", n_workers=3)) as s:
        yield s


@pytest.fixture(scope="module")
def nginx(nginx_bin, workdir, synapse):
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing (run `just build`)")
    with running(Nginx(nginx_bin, workdir / "nginx", synapse, WASM)) as n:
        yield n


@pytest.fixture(scope="module")
def placed(nginx, synapse):
    """samples_for_spread() users with DEVICES_PER_USER devices each (logged in through nginx),
    every device synced twice. Returns [(user_id, devices, {worker, ...})]."""
    users = []
    for i in range(samples_for_spread()):
        first = synapse.register(f"ngx{i}")
        password = synapse.passwords[first.user_id]
        devices = [
            nginx.login(first.user_id, password, f"ngx{i}-dev{d}") for d in range(DEVICES_PER_USER)
        ]
        users.append((first.user_id, devices))
    placed = []
    for user_id, devices in users:
        workers = set()
        for _ in range(2):
            for device in devices:
                r, _ = nginx.sync([bearer(device.token)])
                assert r.status == 200, (user_id, r.status, r.body[:200])
                workers.add(nginx.served(r)[0])
        placed.append((user_id, devices, workers))
    return placed


# --------------------------------------------------------------------------------------------
# tests


def test_the_shipped_file_passes_nginx_t_with_only_paths_substituted(nginx_bin, workdir):
    """Host names, `resolve`, the resolvers, the filter's module: `nginx -t` accepts the file as
    shipped (only the .wasm and log/pid paths changed; names are resolved at run time)."""
    d = workdir / "nginx-t"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(render_nginx_config(workdir=d, wasm=WASM.resolve()))
    proc = subprocess.run(
        [nginx_bin, "-t", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test is successful" in proc.stderr


def test_each_user_lands_on_one_worker_and_users_spread(placed, synapse):
    for user_id, _, workers in placed:
        assert len(workers) == 1, f"{user_id}'s devices were served by {sorted(workers)}"
        assert workers <= {f"sync-{i + 1}" for i in range(len(synapse.worker_ports))}, workers
    used = collections.Counter(next(iter(w)) for _, _, w in placed)
    assert len(used) >= 2, f"every user on one worker: {used}"
    # Synapse itself saw the right requester on the worker port for the syncs.
    seen = synapse.processed_requests(USER_AGENT)
    syncs = [p for p in seen if p.path == stack.SYNC_PATH and p.port in synapse.worker_ports]
    assert {p.requester for p in syncs} >= {u for u, _, _ in placed}


def test_the_worker_gets_exactly_the_key_nginx_hashed_on(nginx, placed):
    user_id, devices, workers = placed[0]
    r, tid = nginx.sync([bearer(devices[0].token)])
    assert r.status == 200
    assert nginx.served(r) == (next(iter(workers)), user_id)
    head = nginx.upstream_head(tid)
    assert head.values(HEADER) == [user_id], head.headers
    assert head.names(HEADER) == [HEADER]


def spoofing_forms(victim: str) -> dict[str, list[tuple[str, str]]]:
    """Every way a client may try to send its own routing key: any letter case, repeated, all
    cases at once, an empty or list value, before and after Authorization."""
    cases = ["X-User-Identifier", "x-user-identifier", "X-USER-IDENTIFIER", "x-User-IDENTIFIER"]
    forms = {f"one header {c}": [(c, victim)] for c in cases}
    forms["repeated"] = [(HEADER, victim), (HEADER, victim)]
    forms["every case at once"] = [(c, victim) for c in cases]
    forms["empty value"] = [(HEADER, "")]
    forms["list value"] = [(HEADER, f"{victim}, {victim}")]
    return forms


FORM_NAMES = list(spoofing_forms("@v:x"))


def other_worker_user(placed, home: str) -> str:
    return next(u for u, _, w in placed if next(iter(w)) != home)


@pytest.mark.parametrize("form", FORM_NAMES)
@pytest.mark.parametrize("order", ["before Authorization", "after Authorization"])
def test_a_spoofed_key_with_a_token_never_reaches_hash_or_worker(nginx, placed, form, order):
    """With a valid token: the worker is the user's own, nginx hashed on the user ID, and the
    worker received exactly one X-User-Identifier, the filter's."""
    for user_id, devices, workers in placed[:4]:
        home = next(iter(workers))
        victim = other_worker_user(placed, home)
        spoof = spoofing_forms(victim)[form]
        auth = [bearer(devices[0].token)]
        r, tid = nginx.sync(spoof + auth if order.startswith("before") else auth + spoof)
        assert r.status == 200, r.body[:200]
        assert nginx.served(r) == (home, user_id), f"{form}: {victim} moved {user_id}"
        head = nginx.upstream_head(tid)
        assert head.values(HEADER) == [user_id], f"{form}: {head.headers}"


@pytest.mark.parametrize("form", FORM_NAMES)
def test_a_spoofed_key_without_a_token_reaches_nothing(nginx, placed, form):
    """No token: the key stays empty (nginx round-robins) and the worker gets no
    X-User-Identifier at all, whatever the client sent."""
    victim = placed[0][0]
    r, tid = nginx.sync(spoofing_forms(victim)[form])
    assert r.status == 401, r.body[:200]  # Synapse: M_MISSING_TOKEN, from a worker
    worker, key = nginx.served(r)
    assert worker.startswith("sync-") and key == ""
    assert nginx.upstream_head(tid).values(HEADER) == []


@pytest.mark.parametrize("spoof", [None, "X-User-Identifier", "x-user-identifier"])
def test_requests_without_a_token_spread(nginx, spoof):
    """No token: the filter writes nothing, so `hash` sees an empty key and nginx falls back to
    round-robin."""
    n = samples_for_spread()
    workers = collections.Counter()
    for _ in range(n):
        r, _ = nginx.sync([(spoof, "@pinned:example.test")] if spoof else [])
        assert r.status == 401, r.body[:200]
        worker, key = nginx.served(r)
        assert key == ""
        workers[worker] += 1
    assert len(workers) >= 2, f"token-less requests all on one worker: {workers}"


def test_other_locations_send_no_key_upstream(nginx, synapse):
    """Outside the sync location the variable stays empty, so nginx sends no X-User-Identifier
    to the main process either (a client copy is dropped there too)."""
    device = synapse.register(f"ngxother{secrets.token_hex(3)}")
    r = nginx.request(
        "GET",
        "/_matrix/client/v3/account/whoami",
        [bearer(device.token), (HEADER, "@spoof:example.test"), ("User-Agent", USER_AGENT)],
    )
    assert r.status == 200 and r.json()["user_id"] == device.user_id
    assert nginx.log_entry(r.request_id)["user"] == ""


def test_an_unreachable_whoami_fails_open_with_the_fallback_key(nginx_bin, workdir, synapse):
    """A refused callout connection reaches the filter as a failed call: the request is served
    (the worker checks the token itself), routed by the token's fallback key, always the same,
    and that key is the one header the worker receives."""
    (closed,) = stack.free_ports(1)
    n = Nginx(
        nginx_bin, workdir / "whoami-closed", synapse, WASM, whoami_upstream=f"{stack.HOST}:{closed}"
    )
    with running(n):
        device = synapse.register("ngxclosed")
        seen = set()
        for _ in range(3):
            r, tid = n.sync([(HEADER, device.user_id), bearer(device.token)])
            assert r.status == 200, r.body[:200]
            worker, key = n.served(r)
            assert key.startswith("~") and key != device.user_id, key
            assert n.upstream_head(tid).values(HEADER) == [key]
            seen.add((worker, key))
        assert len(seen) == 1, seen
        log = n.error_log.read_text()
        assert "whoami failed with no response" in log, log[-3000:]


def test_header_mode_leaks_client_copies_on_this_host(nginx_bin, workdir, synapse):
    """Why nginx must route on the variable. A host fact, not a filter one: with the filter in
    header mode (`nginx_variable` empty: it removes client copies and sets the header in the
    request) and the upstream header left to nginx's copy of the request headers (the
    proxy_set_header line dropped), ngx_wasm_module only *marks* removed headers and nginx's proxy
    module still sends them: a client's copy in another case reaches the worker next to the
    filter's value. If this starts failing, the host changed; the shipped wiring does not depend
    on it either way."""
    n = Nginx(
        nginx_bin,
        workdir / "header-mode",
        synapse,
        WASM,
        drop_lines=(f"proxy_set_header {HEADER} $msr_routing_key;",),
        nginx_variable="",
    )
    with running(n):
        device = synapse.register(f"ngxheader{secrets.token_hex(3)}")
        r, tid = n.sync([("x-USER-identifier", "@spoof:example.test"), bearer(device.token)])
        assert r.status == 200, r.body[:200]
        values = n.upstream_head(tid).values(HEADER)
        assert device.user_id in values and "@spoof:example.test" in values, values


def test_one_whoami_per_token_across_nginx_workers(nginx, synapse):
    """The cache is shared data in `shm_kv`: whichever nginx worker serves a token's next request
    finds the first worker's answer."""
    devices = [synapse.register(f"ngxshared{i}") for i in range(10)]
    responses = []
    for _ in range(6):
        for device in devices:
            r, _ = nginx.sync([bearer(device.token)])
            assert r.status == 200, r.body[:200]
            responses.append(r)
    whoami = collections.Counter(
        p.requester
        for p in synapse.processed_requests(USER_AGENT)
        if p.path == stack.WHOAMI_PATH and p.requester.startswith("@ngxshared")
    )
    assert whoami == {d.user_id: 1 for d in devices}, whoami
    served_by = nginx.nginx_workers(responses)
    if len(served_by) < 2:
        pytest.skip(f"the kernel gave every connection to one nginx worker ({served_by})")


def test_a_token_in_its_refresh_window_is_refreshed_without_stalling(nginx_bin, workdir, synapse):
    """cache_ttl_s=5: the refresh window is the last 0.5 s of an entry. A request in it is routed
    by the cached user and refreshes the entry (on ngx_wasm_module it waits for that one call and
    is resumed); the entry then outlives its first expiry, so the next request makes no call."""
    n = Nginx(nginx_bin, workdir / "refresh", synapse, WASM, cache_ttl_s=5)
    with running(n):
        device = synapse.register("ngxrefresh")
        r, _ = n.sync([bearer(device.token)])
        assert r.status == 200, r.body[:200]
        written = time.monotonic()  # the entry was written just before this answer
        time.sleep(max(0.0, 4.65 - (time.monotonic() - written)))
        started = time.monotonic()
        r, _ = n.sync([bearer(device.token)])
        assert r.status == 200, r.body[:200]
        assert time.monotonic() - started < 3, "the refreshing request stalled"
        assert n.served(r)[1] == device.user_id
        time.sleep(max(0.0, 5.6 - (time.monotonic() - written)))  # past the first expiry
        r, _ = n.sync([bearer(device.token)])
        assert r.status == 200 and n.served(r)[1] == device.user_id
        whoami = [
            p
            for p in synapse.processed_requests(USER_AGENT)
            if p.path == stack.WHOAMI_PATH and p.requester == device.user_id
        ]
        assert len(whoami) == 2, f"expected the first call and one refresh, got {len(whoami)}"


def test_a_whoami_timeout_fails_open(nginx_bin, workdir, synapse):
    """A whoami upstream that accepts and never answers: the call times out after
    whoami_timeout_ms and the request is routed with the fallback key."""
    blackhole = socket.socket()
    blackhole.bind((stack.HOST, 0))
    blackhole.listen(16)
    port = blackhole.getsockname()[1]
    n = Nginx(
        nginx_bin,
        workdir / "whoami-timeout",
        synapse,
        WASM,
        whoami_upstream=f"{stack.HOST}:{port}",
        whoami_timeout_ms=500,
    )
    try:
        with running(n):
            device = synapse.register("ngxtimeout")
            started = time.monotonic()
            r, _ = n.sync([bearer(device.token)])
            elapsed = time.monotonic() - started
            assert r.status == 200, r.body[:200]
            assert n.served(r)[1].startswith("~")
            assert 0.4 < elapsed < 5, elapsed
            log = n.error_log.read_text()
            assert "dispatch failed: tcp socket - timed out" in log, log[-3000:]
            assert "whoami failed with no response" in log, log[-3000:]
    finally:
        blackhole.close()


def test_counters_are_visible(nginx):
    pytest.skip(
        "ngx_wasm_module keeps proxy-wasm metrics (pw:matrix_sync_router:*) in shared memory and "
        "exposes them only through its OpenResty Lua FFI; a plain nginx has no endpoint to read them"
    )


BAD = [
    ({"cache_capacity": 0}, "cache_capacity"),
    ({"cache_capcity": 5}, "cache_capcity"),
    ({"whoami_upstream": "synapse_whoami"}, "whoami_upstream"),
    ({"header_name": "Authorization"}, "header_name"),
    ({"proxy": "envoy", "whoami_upstream": "synapse_whoami"}, "nginx_variable"),
]


@pytest.mark.parametrize("override,field", BAD, ids=[f for _, f in BAD])
def test_a_bad_plugin_config_stops_every_worker_naming_the_field(
    nginx_bin, workdir, synapse, override, field
):
    """ngx_wasm_module runs the filter configuration when each worker starts (not in the master,
    not in `nginx -t`): a bad one logs one line naming the field per worker, every worker exits
    with fatal code 2 and is not respawned, and nothing is served. The master stays up."""
    n = Nginx(nginx_bin, workdir / f"bad-{field}-{len(override)}", synapse, WASM, **override)
    test = subprocess.run([*n.argv(), "-t"], capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stderr  # -t never runs the filter

    n.process = stack.Process("nginx (bad config)", n.argv(), n.dir / "nginx.out", n.dir)
    try:

        def all_workers_gone():
            log = n.error_log.read_text() if n.error_log.exists() else ""
            started = len(re.findall(r"start worker process \d+", log))
            dead = len(re.findall(r"exited with fatal code 2 and cannot be respawned", log))
            return log if started and dead == started else None

        log = stack.wait_until(all_workers_gone, 60, "every nginx worker to exit")
        started = len(re.findall(r"start worker process \d+", log))
        lines = [line for line in log.splitlines() if "invalid configuration" in line]
        assert len(lines) == started, log[-3000:]
        assert all(f"field `{field}`" in line for line in lines), lines
        assert f'failed initializing "{FILTER}" filter (on_configure failure)' in log
        with pytest.raises(OSError):  # the master holds the socket; no worker accepts
            n.request("GET", READY_PATH, timeout=2)
    finally:
        n.stop()
