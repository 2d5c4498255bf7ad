"""The filter in a real nginx built with Kong's ngx_wasm_module, in front of the real e2e Synapse.

ngx_wasm_module is in no package registry, so the tests that run nginx need $NGINX_WASM_BIN to
name an nginx binary built with it (e.g. nginx 1.27.4 + ngx_wasm_module + wasmtime); without it
they are skipped with that reason. The offline checks of nginx-wasm/nginx.conf (first section)
always run.

nginx runs the repository's own nginx-wasm/nginx.conf with only the listen port, the upstream
addresses and ports, the whoami upstream, the .wasm path and the log/pid paths substituted (and,
where a test says so, plugin fields or the debug headers uncommented), so the file an operator
starts from is what is tested. Which worker served a request, and the routing key nginx hashed
on, come from the shipped JSON access log (correlated by the X-Request-Id nginx echoes); the
headers each worker actually received are recorded by a HeaderTap (msrtest.tap) between
nginx and each Synapse worker listener. The initial-sync pool and the room workers are the sync
workers' taps, or (in the tests that tell pools apart) taps of their own at other addresses.
"""

from __future__ import annotations

import collections
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from msrbench.noop_wasm import exported_functions
from msrtest import proxyconf
from msrtest.env import E2E_DIR, HOST, WASM, free_ports
from msrtest.httpclient import Response, bearer
from msrtest.matrix import SERVER_NAME, SYNC_PATH, WHOAMI_PATH, Device
from msrtest.nginx import (
    FILTER,
    READY_PATH,
    USER_AGENT,
    Nginx,
    debug_header_lines,
    render_nginx_config,
    sub_one,
    uncomment_debug_headers,
)
from msrtest.procs import Process, running, wait_until
from msrtest.spread import DEVICES_PER_USER, samples_for_spread
from msrtest.synapse import Synapse

NGINX_BIN = os.environ.get("NGINX_WASM_BIN", "")
HEADER = "X-User-Identifier"
ROOM_HEADER = "X-Room-Identifier"
SKIP_REASON = (
    "NGINX_WASM_BIN not set: needs an nginx built with ngx_wasm_module, which is in no package "
    "registry"
)


# --------------------------------------------------------------------------------------------
# offline: nginx-wasm/nginx.conf as shipped (no nginx needed)


@pytest.fixture(scope="module")
def shipped() -> proxyconf.NginxConf:
    return proxyconf.NginxConf.load()


def test_the_shipped_plugin_config_passes_the_schema_and_the_filter_parser(shipped):
    """The proxy_wasm JSON is accepted by the compiled filter (harness, ngx_wasm_module profile
    with exactly the shm_kv zones and `set` variables nginx.conf declares) and by the schema.
    Both locations that run the filter (sync and room) have the same configuration."""
    assert len(shipped.plugin_configs()) == 2
    conf = shipped.plugin_config()
    assert proxyconf.schema_errors(json.loads(conf)) == []
    checked = proxyconf.filter_configure(WASM, conf, zones=shipped.shm_zones())
    assert checked.accepted, checked.output


def server_level(shipped) -> str:
    """The server block without its locations."""
    ((_, server),) = shipped.blocks("server")
    for _, body in shipped.blocks("location"):
        server = server.replace(body, "")
    return server


def test_the_routing_key_is_one_nginx_variable_end_to_end(shipped):
    """What the filter writes, what `hash` uses and what the workers receive are one variable,
    declared at server level, and no location sets headers of its own (a location with any
    proxy_set_header would inherit none of the server's, X-User-Identifier included). The same
    for the room ID: the room workers hash on it and receive it as X-Room-Identifier."""
    conf = json.loads(shipped.plugin_config())
    variable, room = conf["nginx_variable"], conf["nginx_room_variable"]
    assert variable and room and conf["nginx_sync_kind_variable"]
    hashed = {
        name: re.findall(r"^\s*hash \$(\w+) consistent;", body, re.MULTILINE)
        for name, body in shipped.blocks("upstream")
    }
    assert hashed == {
        "synapse_sync_workers": [variable],
        "synapse_initial_sync_workers": [variable],
        "synapse_room_workers": [room],
        "synapse_main": [],
    }
    assert shipped.header_variables(HEADER) == [variable]
    assert shipped.header_variables(ROOM_HEADER) == [room]
    for _, body in shipped.blocks("location"):
        assert "proxy_set_header" not in body
    outside_locations = server_level(shipped)
    for name in (variable, room, conf["nginx_sync_kind_variable"]):
        assert re.search(rf'^\s*set \${name} "";', outside_locations, re.MULTILINE), name
    assert re.search(
        rf"^\s*proxy_set_header {HEADER} \${variable};", outside_locations, re.MULTILINE
    )
    assert re.search(
        rf"^\s*proxy_set_header {ROOM_HEADER} \${room};", outside_locations, re.MULTILINE
    )


def test_the_sync_location_is_the_filters_path_family(shipped):
    assert proxyconf.same_family_as_the_filter([shipped.sync_location_regex()]) == []
    assert "sync_paths" not in json.loads(shipped.plugin_config())  # the filter's defaults


def test_the_room_location_is_the_filters_room_paths(shipped):
    regex = shipped.room_location_regex()
    assert proxyconf.same_family_as_the_filter([regex], "room_paths") == []
    assert "room_paths" not in json.loads(shipped.plugin_config())  # the filter's defaults
    # No path is both: the filter would treat it as a sync (sync_paths win) in either location.
    sync = shipped.sync_location_regex()
    for path in proxyconf.ROOM_SAMPLES + proxyconf.SYNC_SAMPLES:
        assert not (re.search(regex, path) and re.search(sync, path)), path


def test_initial_syncs_have_their_own_pool_with_a_fallback(shipped):
    """The sync location proxies to the upstream a map picks from the filter's sync-kind
    variable: `initial` → the initial-sync pool, anything else → the sync workers. nginx's own
    502 (pool unusable) sends the request to a named location that proxies initial syncs, and only
    those, to the sync workers."""
    kind = json.loads(shipped.plugin_config())["nginx_sync_kind_variable"]
    source, entries = shipped.maps()["msr_sync_pool"]
    assert source == kind
    assert entries == {"initial": "synapse_initial_sync_workers", "default": "synapse_sync_workers"}
    upstreams = {name for name, _ in shipped.blocks("upstream")}
    assert set(entries.values()) <= upstreams
    _, sync = shipped.filter_location("http://$msr_sync_pool")
    (target,) = re.findall(r"^\s*error_page 502 = (@\w+);", sync, re.MULTILINE)
    assert "proxy_intercept_errors" not in shipped.code  # a worker's own 502 is never retried
    ((_, fallback),) = [(a, b) for a, b in shipped.blocks("location") if a == target]
    assert re.search(r"^\s*proxy_pass http://synapse_sync_workers;", fallback, re.MULTILINE)
    assert re.search(rf"if \(\${kind} != initial\) \{{\s*return 502;\s*\}}", fallback)
    assert "proxy_wasm" not in fallback
    assert not re.search(r"^\s*backup\b|\sbackup;", shipped.code, re.MULTILINE)


def test_debug_headers_are_off_and_carry_no_key(shipped):
    """The debug response headers are in the file, commented out; uncommented they name only the
    sync kind and the key's type (from a map that yields user/fallback/none)."""
    assert "X-MSR-" not in shipped.code
    lines = debug_header_lines(shipped.text)
    assert [name for name, _ in lines] == ["X-MSR-Sync-Kind", "X-MSR-Key-Type"]
    conf = json.loads(shipped.plugin_config())
    assert dict(lines) == {
        "X-MSR-Sync-Kind": f"${conf['nginx_sync_kind_variable']}",
        "X-MSR-Key-Type": "$msr_key_type",
    }
    source, entries = shipped.maps()["msr_key_type"]
    assert source == conf["nginx_variable"]
    assert entries == {"": "none", "~^~": "fallback", "default": "user"}
    # At server level, next to X-Request-Id: a location with its own add_header would drop both.
    uncommented = proxyconf.NginxConf(uncomment_debug_headers(shipped.text))
    assert "X-MSR-Sync-Kind" in server_level(uncommented)
    for _, body in uncommented.blocks("location"):
        assert "add_header" not in body


def test_the_access_log_shows_worker_and_key_but_no_token(shipped):
    (fmt,) = re.findall(r"log_format matrix escape=json((?:\s*'[^']*')+);", shipped.code)
    for variable in (
        "$upstream_addr",
        "$msr_routing_key",
        "$msr_sync_kind",
        "$msr_room",
        "$request_id",
    ):
        assert variable in fmt
    # The query string may carry access_token; Authorization carries the token.
    for forbidden in (
        "$request ",
        '$request"',
        "$request_uri",
        "$args",
        "$query_string",
        "$arg_",
        "$http_authorization",
    ):
        assert forbidden not in fmt, forbidden
    assert re.search(r"^\s*access_log \S+ matrix;", shipped.code, re.MULTILINE)


def test_upstreams_are_production_shaped(shipped):
    """Run-time DNS (`resolve` needs a `zone` and a resolver), keep-alive, long-poll timeouts,
    body limits for media and federation, no gzip."""
    code = shipped.code
    assert re.search(r"^\s*resolver \S+", code, re.MULTILINE)
    upstreams = shipped.blocks("upstream")
    assert {name for name, _ in upstreams} == {
        "synapse_sync_workers",
        "synapse_initial_sync_workers",
        "synapse_room_workers",
        "synapse_main",
    }
    for name, body in upstreams:
        assert re.search(r"^\s*zone \S+ \S+;", body, re.MULTILINE), name
        assert re.search(r"^\s*keepalive \d+;", body, re.MULTILINE), name
        servers = re.findall(r"^\s*server (\S+)(.*);", body, re.MULTILINE)
        assert servers and all(" resolve" in params for _, params in servers), name
    assert re.search(r"^\s*gzip off;", code, re.MULTILINE)
    _, sync = shipped.filter_location("http://$msr_sync_pool")
    assert int(re.search(r"proxy_read_timeout (\d+)s;", sync)[1]) >= 120
    ((_, fallback),) = [(a, b) for a, b in shipped.blocks("location") if a.startswith("@")]
    assert int(re.search(r"proxy_read_timeout (\d+)s;", fallback)[1]) >= 120
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
    """Exported function names of a .wasm module (msrbench.noop_wasm reads the sections)."""
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


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def workdir(nginx_bin, request):
    E2E_DIR.mkdir(exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="nginx-wasm-", dir=E2E_DIR))
    yield d
    if request.session.testsfailed == 0 and not os.environ.get("MSR_E2E_KEEP"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"\nnginx-wasm e2e logs kept in {d}")


@pytest.fixture(scope="module")
def synapse(workdir):
    with running(Synapse(workdir / "synapse", n_workers=3)) as s:
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
    syncs = [p for p in seen if p.path == SYNC_PATH and p.port in synapse.worker_ports]
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
    (closed,) = free_ports(1)
    n = Nginx(
        nginx_bin, workdir / "whoami-closed", synapse, WASM, whoami_upstream=f"{HOST}:{closed}"
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
        if p.path == WHOAMI_PATH and p.requester.startswith("@ngxshared")
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
            if p.path == WHOAMI_PATH and p.requester == device.user_id
        ]
        assert len(whoami) == 2, f"expected the first call and one refresh, got {len(whoami)}"


def test_a_whoami_timeout_fails_open(nginx_bin, workdir, synapse):
    """A whoami upstream that accepts and never answers: the call times out after
    whoami_timeout_ms and the request is routed with the fallback key."""
    blackhole = socket.socket()
    blackhole.bind((HOST, 0))
    blackhole.listen(16)
    port = blackhole.getsockname()[1]
    n = Nginx(
        nginx_bin,
        workdir / "whoami-timeout",
        synapse,
        WASM,
        whoami_upstream=f"{HOST}:{port}",
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


# --------------------------------------------------------------------------------------------
# route metadata (issue 7): initial syncs to their own pool, room endpoints hashed by room


@pytest.fixture(scope="module")
def split(nginx_bin, workdir, synapse):
    """nginx.conf with pools of their own: three initial-sync and three room-worker taps (in
    front of Synapse's listeners, at addresses of their own) next to the three sync workers."""
    with running(
        Nginx(nginx_bin, workdir / "split", synapse, WASM, initial_sync_pool=3, room_pool=3)
    ) as n:
        yield n


def pool_of(worker: str) -> str:
    return worker.rsplit("-", 1)[0]


def only(items: set[str], what: str) -> str:
    assert len(items) == 1, f"{what}: {sorted(items)}"
    return next(iter(items))


def since_of(response: Response) -> str:
    return "&since=" + urllib.parse.quote(response.json()["next_batch"], safe="")


def test_initial_and_incremental_syncs_keep_each_user_on_one_worker_of_each_pool(split, placed):
    """No `since`, or `full_state=true` → the initial-sync pool; `since` → the sync workers.
    Every sync of a user (all devices) lands on one worker of each pool, keyed by the user ID;
    users spread over both pools."""
    initial_of, incremental_of = {}, {}
    for user_id, devices, _ in placed:
        seen = collections.defaultdict(set)
        for device in devices:
            auth = [bearer(device.token)]
            first, tid = split.sync(auth)
            assert first.status == 200, first.body[:200]
            later, _ = split.sync(auth, since_of(first))
            full, _ = split.sync(auth, since_of(first) + "&full_state=true")
            for r, kind in ((first, "initial"), (later, "incremental"), (full, "initial")):
                assert r.status == 200, r.body[:200]
                assert split.log_entry(r.request_id)["sync_kind"] == kind
                worker, key = split.served(r)
                assert key == user_id, (kind, key)
                seen[kind].add(worker)
            assert split.upstream_head(tid).values(HEADER) == [user_id]
        initial_of[user_id] = only(seen["initial"], f"{user_id}'s initial syncs")
        incremental_of[user_id] = only(seen["incremental"], f"{user_id}'s incremental syncs")
    assert {pool_of(w) for w in initial_of.values()} == {"initial"}, initial_of
    assert {pool_of(w) for w in incremental_of.values()} == {"sync"}, incremental_of
    assert len(set(initial_of.values())) >= 2, f"initial syncs all on one worker: {initial_of}"
    assert len(set(incremental_of.values())) >= 2, f"all users on one worker: {incremental_of}"


CHOOSERS = {
    "X-MSR-Sync-Kind header": ([("X-MSR-Sync-Kind", "{kind}")], ""),
    "msr_sync_kind header": ([("Msr-Sync-Kind", "{kind}")], ""),
    "msr_sync_kind argument": ([], "&msr_sync_kind={kind}&msr_sync_pool=synapse_{kind}_workers"),
    "X-User-Identifier": ([(HEADER, "@someone:else")], ""),
}


@pytest.mark.parametrize("chooser", list(CHOOSERS))
def test_a_client_cannot_choose_the_pool(split, placed, chooser):
    """Whatever a client sends, the pool follows the filter's reading of the query."""
    user_id, devices, _ = placed[1]
    auth = [bearer(devices[0].token)]
    headers, query = CHOOSERS[chooser]
    first, _ = split.sync(auth)
    # (what the client claims, the query that makes the other kind, that kind's pool)
    for claim, real, pool in (("initial", since_of(first), "sync"), ("incremental", "", "initial")):
        sent = [(n, v.format(kind=claim)) for n, v in headers]
        r, _ = split.sync(sent + auth, real + query.format(kind=claim))
        assert r.status == 200, r.body[:200]
        assert pool_of(split.served(r)[0]) == pool, (claim, split.log_entry(r.request_id))
        assert split.served(r)[1] == user_id


def test_with_every_initial_sync_worker_down_the_sync_workers_answer(nginx_bin, workdir, synapse):
    """Nothing listens on the initial-sync pool's ports: nginx answers 502 itself (connections
    refused, then "no live upstreams" while the servers are marked failed), and the error_page
    sends the initial sync on to the sync workers, still hashed by user: to the worker that serves
    the user's incremental syncs."""
    dead = free_ports(2)
    n = Nginx(nginx_bin, workdir / "initial-down", synapse, WASM, initial_sync_ports=dead)
    with running(n):
        for i in range(4):
            device = synapse.register(f"ngxnopool{i}")
            auth = [bearer(device.token)]
            first, tid = n.sync(auth)
            assert first.status == 200, first.body[:200]
            worker, key = n.served(first)
            assert pool_of(worker) == "sync" and key == device.user_id, (worker, key)
            entry = n.log_entry(first.request_id)
            assert entry["sync_kind"] == "initial"
            tried, _, final = entry["upstream"].rpartition(" : ")
            assert tried and final in n.workers, entry["upstream"]
            assert set(re.split(r", ", tried)) <= {f"{HOST}:{p}" for p in dead} | {
                "synapse_initial_sync_workers"
            }, entry["upstream"]
            assert n.upstream_head(tid).values(HEADER) == [device.user_id]
            later, _ = n.sync(auth, since_of(first))
            assert later.status == 200 and n.served(later) == (worker, device.user_id)
            assert " : " not in n.log_entry(later.request_id)["upstream"]
        log = n.error_log.read_text()
        assert "connect() failed (111: Connection refused)" in log, log[-3000:]


def test_only_initial_syncs_fall_back(nginx_bin, workdir, synapse):
    """With the sync workers down, an incremental sync gets nginx's 502 and is not proxied a
    second time by the fallback location (no second upstream group in $upstream_addr), while
    initial syncs are still served by their own pool."""
    dead = free_ports(2)
    n = Nginx(nginx_bin, workdir / "sync-down", synapse, WASM, sync_ports=dead, initial_sync_pool=1)
    with running(n):
        device = synapse.register("ngxsyncdown")
        first, _ = n.sync([bearer(device.token)])
        assert first.status == 200 and n.served(first) == ("initial-1", device.user_id)
        later, _ = n.sync([bearer(device.token)], since_of(first))
        assert later.status == 502, later.body[:200]
        entry = n.log_entry(later.request_id)
        assert entry["sync_kind"] == "incremental"
        assert " : " not in entry["upstream"], entry["upstream"]


@pytest.mark.parametrize(
    "servers,expected",
    [(2, [504, 504, 200, 200]), (1, [504, 504])],
    ids=["two servers", "one server"],
)
def test_servers_that_drop_connections_cost_a_504_before_the_fallback(
    nginx_bin, workdir, synapse, servers, expected
):
    """Initial-sync servers whose listen queues are full (SYNs dropped: no refusal, as with a host
    gone from the network): an initial sync sent to one waits proxy_connect_timeout (5 s) and gets
    nginx's 504, which the error_page leaves alone. That marks the server failed (max_fails=1);
    once every server is, initial syncs fall back to the sync workers at once. nginx never marks
    the only server of a group failed: with one server, every initial sync waits and gets 504."""
    silent, held = [], []
    for _ in range(servers):
        listener = socket.socket()
        listener.bind((HOST, 0))
        listener.listen(0)
        for _ in range(3):  # one fills the accept queue, the rest hang: so would nginx
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(listener.getsockname())
            held.append(s)
        silent.append(listener.getsockname()[1])
        held.append(listener)
    try:
        n = Nginx(
            nginx_bin, workdir / f"silent-{servers}", synapse, WASM, initial_sync_ports=silent
        )
        with running(n):
            outcomes = []
            for i in range(len(expected)):
                device = synapse.register(f"ngxsilent{servers}x{i}")
                started = time.monotonic()
                r, _ = n.sync([bearer(device.token)])
                outcomes.append((r.status, time.monotonic() - started, n.served(r)))
            assert [s for s, _, _ in outcomes] == expected, outcomes
            for status, took, (worker, _) in outcomes:
                if status == 504:
                    assert took >= 4.5, outcomes  # proxy_connect_timeout
                else:
                    assert took < 3 and pool_of(worker) == "sync", outcomes
    finally:
        for s in held:
            s.close()


def test_nginx_refuses_backup_servers_with_hash(nginx_bin, workdir):
    """Why the fallback is an error_page: a `backup` server in a hashed upstream is refused."""
    d = workdir / "backup"
    d.mkdir()
    text = render_nginx_config(workdir=d, wasm=WASM.resolve())
    text = sub_one(
        r"^(\s*server synapse-initial-sync-1:8083 )",
        r"        server synapse-sync-1:8083 resolve backup;\n\1",
        text,
        "initial-sync server line",
    )
    (d / "nginx.conf").write_text(text)
    proc = subprocess.run(
        [nginx_bin, "-t", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert 'balancing method does not support parameter "backup"' in proc.stderr, proc.stderr


def create_room(nginx: Nginx, token: str) -> str:
    r = nginx.request(
        "POST",
        "/_matrix/client/v3/createRoom",
        [bearer(token), ("Content-Type", "application/json")],
        json.dumps({"preset": "public_chat"}).encode(),
    )
    assert r.status == 200, r.body[:300]
    return r.json()["room_id"]


@pytest.fixture(scope="module")
def rooms(split, synapse):
    """samples_for_spread() rooms created through nginx (main location, no filter) by a user who
    never syncs; a second user who is in none of them."""
    owner = synapse.register(f"ngxroomowner{secrets.token_hex(3)}")
    reader = synapse.register(f"ngxroomreader{secrets.token_hex(3)}")
    return owner, reader, [create_room(split, owner.token) for _ in range(samples_for_spread())]


def room_requests(room: str, owner: Device, reader: Device):
    """(method, path, headers, body) of room-endpoint requests about `room`: several endpoints,
    askers (the owner, a non-member, no token) and spellings of the room ID."""
    quoted = urllib.parse.quote(room, safe="")
    txn = secrets.token_hex(4)
    message = json.dumps({"msgtype": "m.text", "body": "hello"}).encode()
    base = "/_matrix/client"
    return [
        ("GET", f"{base}/v3/rooms/{quoted}/messages?dir=b&limit=1", [bearer(owner.token)], None),
        ("GET", f"{base}/v3/rooms/{room}/members", [bearer(owner.token)], None),
        ("GET", f"{base}/r0/rooms/{quoted}/state", [bearer(reader.token)], None),
        ("GET", f"{base}/v3/rooms/{quoted}/joined_members", [], None),
        (
            "PUT",
            f"{base}/v3/rooms/{quoted}/send/m.room.message/{txn}",
            [bearer(owner.token), ("Content-Type", "application/json")],
            message,
        ),
        ("GET", f"{base}/v1/rooms/{quoted}/hierarchy", [bearer(owner.token)], None),
    ]


def test_room_requests_reach_one_room_worker_per_room_and_rooms_spread(split, synapse, rooms):
    """Every request about one room (any endpoint, asker or spelling of its ID) reaches the same
    room worker, hashed on the room ID the filter wrote ($msr_room, which the worker also gets as
    its one X-Room-Identifier); rooms spread over the room workers. The filter makes no whoami
    callout for room endpoints: the two users' tokens reach Synapse's whoami only once one of
    them syncs."""
    owner, reader, room_ids = rooms
    worker_of = {}
    for room in room_ids:
        workers = set()
        for method, path, headers, body in room_requests(room, owner, reader):
            r, tid = split.traced(method, path, headers, body)
            assert r.status in (200, 401, 403), (path, r.status, r.body[:200])
            entry = split.log_entry(r.request_id)
            assert (entry["room"], entry["user"], entry["sync_kind"]) == (room, "", ""), entry
            workers.add(split.served(r)[0])
            head = split.upstream_head(tid)
            assert head.values(ROOM_HEADER) == [room] and head.values(HEADER) == [], head.headers
        worker_of[room] = only(workers, f"requests about {room}")
    assert {pool_of(w) for w in worker_of.values()} == {"room"}, worker_of
    assert len(set(worker_of.values())) >= 2, f"rooms all on one worker: {worker_of}"

    def whoami_of(device):
        return [
            p
            for p in synapse.processed_requests(USER_AGENT)
            if p.path == WHOAMI_PATH and p.requester == device.user_id
        ]

    assert whoami_of(owner) == [] and whoami_of(reader) == []
    r, _ = split.sync([bearer(owner.token)])  # the same token on a sync path: one callout
    assert r.status == 200 and split.served(r)[1] == owner.user_id
    assert len(whoami_of(owner)) == 1 and whoami_of(reader) == []


ROOM_SPOOFS = {
    "X-Room-Identifier": lambda victim: [(ROOM_HEADER, victim)],
    "x-room-identifier twice": lambda victim: [("x-room-identifier", victim)] * 2,
    "every case": lambda victim: [(c, victim) for c in ("X-ROOM-IDENTIFIER", "x-Room-identifier")],
    "Msr-Room header": lambda victim: [("Msr-Room", victim)],
}


@pytest.mark.parametrize("spoof", list(ROOM_SPOOFS))
def test_a_client_cannot_choose_the_room_worker(split, rooms, spoof):
    """A request about room A that names room B (on another room worker) in a header or an
    argument stays on A's worker, and the worker receives A as its one X-Room-Identifier. A room
    endpoint with an alias in the path has no key: the worker receives no X-Room-Identifier."""
    owner, _, room_ids = rooms
    by_worker = {}
    for room in room_ids:
        r, _ = split.traced(
            "GET", f"/_matrix/client/v3/rooms/{room}/members", [bearer(owner.token)]
        )
        by_worker.setdefault(split.served(r)[0], room)
    assert len(by_worker) >= 2, by_worker
    (home, room), (_, victim) = list(by_worker.items())[:2]
    quoted = urllib.parse.quote(victim, safe="")
    path = (
        f"/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=1&room_id={quoted}&msr_room={quoted}"
    )
    r, tid = split.traced("GET", path, [*ROOM_SPOOFS[spoof](victim), bearer(owner.token)])
    assert r.status == 200, r.body[:200]
    assert split.served(r)[0] == home and split.log_entry(r.request_id)["room"] == room
    assert split.upstream_head(tid).values(ROOM_HEADER) == [room]

    alias = urllib.parse.quote(f"#nowhere:{SERVER_NAME}", safe="")
    r, tid = split.traced(
        "GET",
        f"/_matrix/client/v3/rooms/{alias}/members",
        [*ROOM_SPOOFS[spoof](victim), bearer(owner.token)],
    )
    entry = split.log_entry(r.request_id)
    assert (entry["room"], pool_of(split.served(r)[0])) == ("", "room"), entry
    assert split.upstream_head(tid).values(ROOM_HEADER) == []


@pytest.mark.parametrize(
    "spelled", ["%21abc%3Aexample.test", "!abc:example.test", "%21ab%2541%3Aexample.test"]
)
def test_the_room_key_is_the_room_synapse_reads(split, rooms, spelled):
    """However the client encodes the room ID, nginx hashes on the room Synapse serves (named in
    its own 403 for a room the user is not in). ngx_wasm_module hands the filter nginx's decoded
    URI, so the filter must not decode it again: `%2541` is Synapse's `%41`, not `A`."""
    owner, _, _ = rooms
    r, _ = split.traced("GET", f"/_matrix/client/v3/rooms/{spelled}/members", [bearer(owner.token)])
    assert r.status == 403, r.body[:200]
    (served,) = re.findall(r" not in room (\S+),", r.json()["error"])
    assert split.log_entry(r.request_id)["room"] == served, (spelled, served)


def test_debug_headers_show_the_sync_kind_and_key_type_when_enabled(
    nginx_bin, workdir, synapse, nginx
):
    """Off as shipped; with the two add_header lines uncommented, a client sees the sync kind
    and the kind of key (user, fallback, none), never the key or its token."""
    device = synapse.register(f"ngxdebug{secrets.token_hex(3)}")
    r, _ = nginx.sync([bearer(device.token)])
    assert r.status == 200 and not [h for h in r.headers if h.startswith("x-msr-")], r.headers

    n = Nginx(nginx_bin, workdir / "debug-headers", synapse, WASM, debug_headers=True)
    with running(n):
        auth = [bearer(device.token)]
        first, _ = n.sync(auth)  # a new token: whoami
        later, _ = n.sync(auth, since_of(first))  # cached
        rejected_token = f"msr_not_a_token_{secrets.token_hex(8)}"
        rejected, _ = n.sync([bearer(rejected_token)])
        none, _ = n.sync()
        room = create_room(n, device.token)
        in_room, _ = n.traced("GET", f"/_matrix/client/v3/rooms/{room}/members", auth)
        other, _ = n.traced("GET", READY_PATH)
        seen = {
            name: (r.status, r.headers.get("x-msr-sync-kind"), r.headers.get("x-msr-key-type"))
            for name, r in (
                ("initial", first),
                ("incremental", later),
                ("rejected", rejected),
                ("no token", none),
                ("room", in_room),
                ("other", other),
            )
        }
        assert seen == {
            "initial": (200, "initial", "user"),
            "incremental": (200, "incremental", "user"),
            "rejected": (401, "initial", "fallback"),
            "no token": (401, "initial", "none"),
            "room": (200, None, "none"),
            "other": (200, None, "none"),
        }, seen
        assert n.served(later)[1] == device.user_id
        assert n.served(rejected)[1].startswith("~")
        for r in (first, later, rejected, none, in_room, other):
            assert r.request_id  # X-Request-Id still added
            shown = " ".join(v for k, v in r.headers.items() if k.startswith("x-msr-"))
            for secret in (device.token, rejected_token, device.user_id):
                assert secret not in shown


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

    n.process = Process("nginx (bad config)", n.argv(), n.dir / "nginx.out", n.dir)
    try:

        def all_workers_gone():
            log = n.error_log.read_text() if n.error_log.exists() else ""
            started = len(re.findall(r"start worker process \d+", log))
            dead = len(re.findall(r"exited with fatal code 2 and cannot be respawned", log))
            return log if started and dead == started else None

        log = wait_until(all_workers_gone, 60, "every nginx worker to exit")
        started = len(re.findall(r"start worker process \d+", log))
        lines = [line for line in log.splitlines() if "invalid configuration" in line]
        assert len(lines) == started, log[-3000:]
        assert all(f"field `{field}`" in line for line in lines), lines
        assert f'failed initializing "{FILTER}" filter (on_configure failure)' in log
        with pytest.raises(OSError):  # the master holds the socket; no worker accepts
            n.request("GET", READY_PATH, timeout=2)
    finally:
        n.stop()


def test_v4_sliding_sync_of_two_devices_goes_to_the_users_worker(nginx, placed):
    """MSC4186's `POST /_matrix/client/v4/sync` is in the shipped sync location: keyed by the
    user, on the user's worker (Synapse 1.163.2 answers it 404 from that worker)."""
    user_id, devices, workers = next(p for p in placed if len(p[2]) == 1)
    for n, device in enumerate(devices[:2]):
        body = json.dumps({"conn_id": f"conn-{n}", "lists": {}, "timeout": 0}).encode()
        headers = [bearer(device.token), ("Content-Type", "application/json")]
        r, _ = nginx.traced("POST", "/_matrix/client/v4/sync", headers, body)
        assert nginx.served(r) == (next(iter(workers)), user_id), (r.status, r.body[:200])


def test_two_authorization_lines_are_answered_400_before_the_filter(nginx, placed):
    """nginx refuses a second Authorization line itself ("client sent duplicate header line"):
    the request reaches neither the filter nor a worker."""
    _, devices, _ = placed[0]
    r, test_id = nginx.sync([bearer(devices[0].token), bearer(devices[1].token)])
    assert r.status == 400, (r.status, r.body[:200])
    heads = [h for t in nginx.all_taps for h in t.find("X-Test-Id", test_id)]
    assert heads == [], "a worker received the request"
