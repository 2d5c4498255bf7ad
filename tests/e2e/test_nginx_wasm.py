"""The filter in a real nginx built with Kong's ngx_wasm_module, in front of the real e2e Synapse.

ngx_wasm_module is in no package registry, so these tests run only when $NGINX_WASM_BIN names an
nginx binary built with it (e.g. nginx 1.27.4 + ngx_wasm_module + wasmtime); otherwise every test
is skipped with that reason. nginx runs the repository's own nginx-wasm/nginx.conf with only
ports, paths and the whoami upstream substituted (plus daemon/pid/log lines), so the file an
operator starts from is what is tested. Which worker served a request is read from an access log
of `$upstream_addr`, correlated by a per-request `X-Test-Id` header.
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
import tempfile
import time
from pathlib import Path

import pytest

import stack
from conftest import DEVICES_PER_USER, WASM, samples_for_spread

NGINX_BIN = os.environ.get("NGINX_WASM_BIN", "")
NGINX_CONF = stack.REPO / "nginx-wasm" / "nginx.conf"
FILTER = "matrix_sync_router"
SKIP_REASON = (
    "NGINX_WASM_BIN not set: needs an nginx built with ngx_wasm_module, which is in no package "
    "registry"
)
USER_AGENT = "msr-nginx-wasm-e2e"


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


# --------------------------------------------------------------------------------------------
# nginx-wasm/nginx.conf with only ports, paths and plugin fields substituted


def _sub_one(pattern: str, repl, text: str, what: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    if n != 1:
        raise stack.StackError(f"nginx-wasm/nginx.conf: expected exactly one {what}, found {n}")
    return new


def _upstream(text: str, name: str, ports: list[int]) -> str:
    """Replace the `server` lines of `upstream name { ... }` with 127.0.0.1:<port> servers."""

    def repl(m: re.Match) -> str:
        body = re.sub(r"^\s*server\s.*\n", "", m["body"], flags=re.MULTILINE)
        servers = "".join(f"        server {stack.HOST}:{p};\n" for p in ports)
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
    listen_port: int,
    main_port: int,
    worker_ports: list[int],
    wasm: Path,
    plugin_overrides: dict | None = None,
    source: Path = NGINX_CONF,
) -> str:
    text = source.read_text()
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
    text = _upstream(text, "synapse_sync_workers", worker_ports)
    text = _upstream(text, "synapse_main", [main_port])
    text = _sub_one(
        r"^(\s*)listen \S+;", lambda m: f"{m[1]}listen {stack.HOST}:{listen_port};", text, "listen"
    )

    def plugin(m: re.Match) -> str:
        conf = json.loads(m[2])
        conf["whoami_upstream"] = f"{stack.HOST}:{main_port}"
        conf.update(plugin_overrides or {})
        return f"{m[1]}'{json.dumps(conf)}';"

    text = _sub_one(rf"^(\s*proxy_wasm {FILTER} )'(.*)';", plugin, text, "proxy_wasm line")
    access_log = (
        "    log_format msr_e2e '$http_x_test_id $upstream_addr $status $pid \"$http_x_user_identifier\"';\n"
        f"    access_log {workdir / 'access.log'} msr_e2e;\n"
    )
    text = _sub_one(r"^http \{\n", lambda m: m[0] + access_log, text, "http block")
    return text


class Nginx(stack.Service):
    def __init__(self, binary: str, workdir: Path, synapse: stack.Synapse, wasm: Path, **overrides):
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.synapse = synapse
        (self.port,) = stack.free_ports(1)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            render_nginx_config(
                workdir=self.dir,
                listen_port=self.port,
                main_port=synapse.main_port,
                worker_ports=synapse.worker_ports,
                wasm=Path(wasm).resolve(),
                plugin_overrides=overrides or None,
            )
        )
        self.access_log = self.dir / "access.log"
        self.error_log = self.dir / "error.log"
        self.workers = {
            f"{stack.HOST}:{p}": f"sync-{i + 1}" for i, p in enumerate(synapse.worker_ports)
        }

    def argv(self) -> list[str]:
        return [self.binary, "-p", str(self.dir), "-e", str(self.error_log), "-c", str(self.conf)]

    def start(self, timeout: float = 60.0) -> "Nginx":
        self.process = stack.Process("nginx", self.argv(), self.dir / "nginx.out", self.dir)
        self.wait_for(
            lambda: self.request("GET", "/health", timeout=2).status == 200,
            timeout,
            "nginx proxying /health to Synapse",
            interval=0.2,
        )
        return self

    def request(self, method: str, path: str, headers=(), body=None, timeout: float = 60.0):
        return stack.http_request(self.port, method, path, headers, body, timeout)

    def sync(self, token: str | None, extra_headers=()) -> tuple[stack.Response, str]:
        """GET /sync?timeout=0 through nginx; returns (response, test id)."""
        test_id = secrets.token_hex(8)
        headers = [("X-Test-Id", test_id), ("User-Agent", USER_AGENT), *extra_headers]
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        return self.request("GET", f"{stack.SYNC_PATH}?timeout=0", headers), test_id

    def log_entry(self, test_id: str, timeout: float = 10.0) -> tuple[str, str, str]:
        """(worker name, status, $http_x_user_identifier at log time) of one request."""

        def find():
            for line in self.access_log.read_text().splitlines():
                tid, upstream, status, _pid, ident = line.split(" ", 4)
                if tid == test_id:
                    ident = ident.strip('"')  # nginx logs an empty variable as "-"
                    return (
                        self.workers.get(upstream, upstream),
                        status,
                        "" if ident == "-" else ident,
                    )
            return None

        return self.wait_for(find, timeout, f"access log line of {test_id}", interval=0.05)

    def nginx_workers(self, test_ids: set[str]) -> set[str]:
        """The nginx worker processes (pids) that served these requests."""
        lines = (line.split(" ", 4) for line in self.access_log.read_text().splitlines())
        return {fields[3] for fields in lines if fields[0] in test_ids}

    # Password login through nginx's `location /` (Envoy's helper only uses self.request).
    login = stack.Envoy.login


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
                r, tid = nginx.sync(device.token)
                assert r.status == 200, (user_id, r.status, r.body[:200])
                worker, _, ident = nginx.log_entry(tid)
                workers.add(worker)
        placed.append((user_id, devices, workers))
    return placed


# --------------------------------------------------------------------------------------------
# tests


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


def test_the_filter_sets_the_header_nginx_hashes_on(nginx, placed):
    """`$http_x_user_identifier` (what the upstream hashes on) is the user the filter set."""
    user_id, devices, _ = placed[0]
    _, tid = nginx.sync(devices[0].token)
    assert nginx.log_entry(tid)[2] == user_id


SPOOF_NAMES = ["X-User-Identifier", "x-user-identifier", "X-USER-IDENTIFIER", "x-User-IDENTIFIER"]


@pytest.mark.parametrize("name", SPOOF_NAMES)
def test_a_spoofed_header_does_not_move_a_user(nginx, placed, name):
    by_worker: dict[str, str] = {}
    for user_id, _, workers in placed:
        by_worker.setdefault(next(iter(workers)), user_id)
    assert len(by_worker) >= 2
    for user_id, devices, workers in placed[:5]:
        home = next(iter(workers))
        others = [u for w, u in by_worker.items() if w != home]
        for target in others:
            r, tid = nginx.sync(devices[0].token, [(name, target)])
            assert r.status == 200, r.body[:200]
            worker, _, ident = nginx.log_entry(tid)
            assert worker == home, f"{name}: {target} moved {user_id} from {home} to {worker}"
            assert ident == user_id, f"{name}: nginx hashed on {ident!r}"


def test_every_case_variant_at_once_does_not_move_a_user(nginx, placed):
    user_id, devices, workers = placed[1]
    home = next(iter(workers))
    others = [u for u, _, w in placed if w != workers]
    r, tid = nginx.sync(devices[1].token, [(n, others[0]) for n in SPOOF_NAMES])
    assert r.status == 200
    assert nginx.log_entry(tid)[0] == home


@pytest.mark.parametrize("spoof", [None, "X-User-Identifier", "x-user-identifier"])
def test_requests_without_a_token_spread(nginx, spoof):
    """No token: the filter sets nothing (and removes client copies), so `hash` sees an empty key
    and nginx falls back to round-robin."""
    n = samples_for_spread()
    workers = collections.Counter()
    for _ in range(n):
        extra = [(spoof, "@pinned:example.test")] if spoof else []
        r, tid = nginx.sync(None, extra)
        assert r.status == 401, r.body[:200]  # Synapse: M_MISSING_TOKEN, from a worker
        worker, _, ident = nginx.log_entry(tid)
        assert ident == "", f"{spoof} survived: {ident!r}"
        workers[worker] += 1
    assert len(workers) >= 2, f"token-less requests all on one worker: {workers}"


def test_an_unreachable_whoami_fails_open_with_the_fallback_key(nginx_bin, workdir, synapse):
    """A refused callout connection reaches the filter as a failed call: the request is served
    (the worker checks the token itself), routed by the token's fallback key, always the same."""
    (closed,) = stack.free_ports(1)
    n = Nginx(
        nginx_bin,
        workdir / "whoami-closed",
        synapse,
        WASM,
        whoami_upstream=f"{stack.HOST}:{closed}",
    )
    with running(n):
        device = synapse.register("ngxclosed")
        seen = set()
        for _ in range(3):
            r, tid = n.sync(device.token, [("X-User-Identifier", device.user_id)])
            assert r.status == 200, r.body[:200]
            worker, _, ident = n.log_entry(tid)
            assert ident.startswith("~") and ident != device.user_id, ident
            seen.add((worker, ident))
        assert len(seen) == 1, seen
        log = n.error_log.read_text()
        assert "whoami failed with no response" in log, log[-3000:]


@pytest.mark.parametrize("name", ["X-User-Identifier", "X-USER-IDENTIFIER"])
def test_the_host_matches_header_names_case_insensitively(nginx_bin, workdir, synapse, name):
    """A host fact, not a filter one: with `"proxy": "envoy"` the filter only replaces (with a
    token) or removes (without) the lower-case name, and ngx_wasm_module still drops a client's
    copy in another case. If this fails, the host matches names exactly: keep "ngx_wasm_module"."""
    n = Nginx(nginx_bin, workdir / f"envoy-profile-{name}", synapse, WASM, proxy="envoy")
    with running(n):
        device = synapse.register(f"ngxcase{secrets.token_hex(4)}")
        r, tid = n.sync(device.token, [(name, "@spoof:example.test")])
        assert r.status == 200, r.body[:200]
        assert n.log_entry(tid)[2] == device.user_id
        r, tid = n.sync(None, [(name, "@spoof:example.test")])
        assert n.log_entry(tid)[2] == ""


def test_one_whoami_per_token_across_nginx_workers(nginx, synapse):
    """The cache is shared data in `shm_kv`: whichever nginx worker serves a token's next request
    finds the first worker's answer."""
    devices = [synapse.register(f"ngxshared{i}") for i in range(10)]
    test_ids = set()
    for _ in range(6):
        for device in devices:
            r, tid = nginx.sync(device.token)
            assert r.status == 200, r.body[:200]
            test_ids.add(tid)
    for tid in test_ids:
        nginx.log_entry(tid)  # all logged
    whoami = collections.Counter(
        p.requester
        for p in synapse.processed_requests(USER_AGENT)
        if p.path == stack.WHOAMI_PATH and p.requester.startswith("@ngxshared")
    )
    assert whoami == {d.user_id: 1 for d in devices}, whoami
    served_by = nginx.nginx_workers(test_ids)
    if len(served_by) < 2:
        pytest.skip(f"the kernel gave every connection to one nginx worker ({served_by})")


def test_a_token_in_its_refresh_window_is_refreshed_without_stalling(nginx_bin, workdir, synapse):
    """cache_ttl_s=5: the refresh window is the last 0.5 s of an entry. A request in it is routed
    by the cached user and refreshes the entry (on ngx_wasm_module it waits for that one call and
    is resumed); the entry then outlives its first expiry, so the next request makes no call."""
    n = Nginx(nginx_bin, workdir / "refresh", synapse, WASM, cache_ttl_s=5)
    with running(n):
        device = synapse.register("ngxrefresh")
        r, _ = n.sync(device.token)
        assert r.status == 200, r.body[:200]
        written = time.monotonic()  # the entry was written just before this answer
        time.sleep(max(0.0, 4.65 - (time.monotonic() - written)))
        started = time.monotonic()
        r, tid = n.sync(device.token)
        assert r.status == 200, r.body[:200]
        assert time.monotonic() - started < 3, "the refreshing request stalled"
        assert n.log_entry(tid)[2] == device.user_id
        time.sleep(max(0.0, 5.6 - (time.monotonic() - written)))  # past the first expiry
        r, tid = n.sync(device.token)
        assert r.status == 200 and n.log_entry(tid)[2] == device.user_id
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
            r, tid = n.sync(device.token)
            elapsed = time.monotonic() - started
            assert r.status == 200, r.body[:200]
            assert n.log_entry(tid)[2].startswith("~")
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
]


@pytest.mark.parametrize("override,field", BAD, ids=[f for _, f in BAD])
def test_a_bad_plugin_config_stops_every_worker_naming_the_field(
    nginx_bin, workdir, synapse, override, field
):
    """ngx_wasm_module runs the filter configuration when each worker starts (not in the master,
    not in `nginx -t`): a bad one logs one line naming the field per worker, every worker exits
    with fatal code 2 and is not respawned, and nothing is served. The master stays up."""
    n = Nginx(nginx_bin, workdir / f"bad-{field}", synapse, WASM, **override)
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
            n.request("GET", "/health", timeout=2)
    finally:
        n.stop()
