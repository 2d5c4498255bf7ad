#!/usr/bin/env python3
"""`just bench-synapse`: what routing /sync by user saves Synapse, on real workers.

PostgreSQL, Redis, the Synapse main process and `--workers` generic_worker sync workers
(msrtest.workers, with `enable_metrics` and a metrics listener per worker) on 127.0.0.1,
and Envoy in front. Three routing policies side by side in one run:

  user         envoy.yaml as shipped (the filter; MAGLEV on the user it sets in x-user-identifier)
  token        no filter; MAGLEV on the Authorization header (per device, like ess-helm's HAProxy)
  round_robin  no filter; ROUND_ROBIN (no stickiness)

Interleaved rounds, the policy order rotated every round. For each policy: the sync workers are
restarted (no policy inherits another's warm caches), then two windows, each with a freshly
started Envoy: "cold" (measured from right after the restart: the clients' reconnect and the
first messages) and "steady" (after the reconnect; the filter's token cache was filled by the
paced reconnect below `max_whoami_in_flight`). In each window, every device long-polls /sync
through Envoy while senders post messages straight to the main process (synapse_load.py).

Figures per window, from the workers' own Prometheus metrics, their logs and PostgreSQL's
pg_stat_database (msrbench.synapse_report turns them into BENCHMARKS.md's section and
bench/synapse.svg).
Everything listens on 127.0.0.1; every child is stopped at the end, on Ctrl-C and if this dies.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from msrbench import synapse_load
from msrbench.envoy import envoy_version
from msrbench.report import git_describe
from msrtest import workers
from msrtest.env import DEFAULT_WASM, REPO
from msrtest.envoy import Envoy, cluster_config
from msrtest.httpclient import http_request
from msrtest.procs import StackError, stop_on_termination, venv_bin, wait_until

BENCH = Path(__file__).resolve().parent

POLICIES = ("user", "token", "round_robin")
WINDOWS = ("cold", "steady")
SYNC_CLUSTER = "synapse_sync_workers"
WASM_FILTER = "envoy.filters.http.wasm"
# A worker that has to catch up with a client's `since` first logs this (Synapse 1.163,
# notifier.wait_for_stream_token), and the warning after 10 s of waiting.
WAITING = "Waiting for this worker's streams to advance to given token"
WAIT_TIMED_OUT = "Timed out waiting for this worker's streams to advance"
PG_SETTLE_S = 2.0  # PostgreSQL flushes a backend's statistics within ~1 s of it going idle
FILTER_COUNTERS = ("cache_misses", "whoami_ok", "fallbacks", "shed", "coalesced")

SIZES = {
    # cold, steady: seconds of messages in each window (at --rate, 1 a second by default)
    "default": {"users": 60, "devices": 3, "rooms": 12, "rounds": 3, "cold": 30, "steady": 45},
    "quick": {"users": 12, "devices": 3, "rooms": 4, "rounds": 1, "cold": 12, "steady": 12},
    "smoke": {"users": 6, "devices": 3, "rooms": 2, "rounds": 1, "cold": 8, "steady": 0},
}


def log(msg: str) -> None:
    print(f"[{dt.datetime.now(dt.UTC):%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Envoy per policy


def envoy_for(topo: workers.WorkerStack, policy: str, name: str) -> Envoy:
    """An Envoy (not started) in front of the sync workers, configured for `policy`."""
    envoy = Envoy(topo.dir, name, topo.main, topo.wasm, sync_ports=topo.ports("sync"))
    if policy != "user":
        apply_policy(envoy.cfg, policy)
    return envoy


def _drop_filter_refs(node) -> None:
    """Remove every route's per-filter configuration of the wasm filter (it is not in the
    chain any more)."""
    if isinstance(node, dict):
        per_filter = node.get("typed_per_filter_config")
        if isinstance(per_filter, dict):
            per_filter.pop(WASM_FILTER, None)
            if not per_filter:
                del node["typed_per_filter_config"]
        for v in node.values():
            _drop_filter_refs(v)
    elif isinstance(node, list):
        for v in node:
            _drop_filter_refs(v)


def apply_policy(cfg: dict, policy: str) -> None:
    """envoy.yaml (rendered) without the filter, the sync routes hashed on Authorization
    ("token") or not hashed and the sync workers balanced ROUND_ROBIN ("round_robin")."""
    listener = cfg["static_resources"]["listeners"][0]
    (hcm,) = [
        f["typed_config"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != WASM_FILTER]
    _drop_filter_refs(cfg)
    for vhost in hcm["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            action = route.get("route", {})
            if action.get("cluster") not in (SYNC_CLUSTER, "synapse_initial_sync"):
                continue
            if policy == "token":
                action["hash_policy"] = [{"header": {"header_name": "authorization"}}]
            else:
                action.pop("hash_policy", None)
    if policy == "round_robin":
        cluster_config(cfg, SYNC_CLUSTER)["lb_policy"] = "ROUND_ROBIN"


def filter_counters(envoy: Envoy) -> dict[str, int]:
    stats = envoy.stats()
    return {c: stats.get(f"wasmcustom.matrix_sync_router_{c}", 0) for c in FILTER_COUNTERS}


# --------------------------------------------------------------------------------------------
# Synapse's metrics, logs, PostgreSQL

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def worker_metrics(worker: workers.GenericWorker) -> dict:
    """The figures of one worker's /_synapse/metrics the bench uses."""
    r = http_request(worker.metrics_port, "GET", "/_synapse/metrics", timeout=30)
    if r.status != 200:
        raise StackError(f"{worker.name} metrics: {r.status}")
    m = {
        "notifier_users": 0.0,
        "sync_responses": 0.0,
        "sync_db_txn": 0.0,
        "cpu_s": 0.0,
        "queries": 0.0,
        "lookups": {},
        "hits": {},
    }
    for name, labels, value in parse_prometheus(r.body.decode()):
        sync = labels.get("servlet") == "SyncRestServlet"
        if name == "synapse_notifier_users":
            m["notifier_users"] += value
        elif name == "synapse_http_server_response_count_total" and sync:
            m["sync_responses"] += value
        elif name == "synapse_http_server_response_db_txn_count_total" and sync:
            m["sync_db_txn"] += value
        elif name == "synapse_storage_query_time_count":  # every SQL statement, by verb
            m["queries"] += value
        elif name == "process_cpu_seconds_total":
            m["cpu_s"] += value
        elif name == "synapse_util_caches_cache" and "name" in labels:
            m["lookups"][labels["name"]] = m["lookups"].get(labels["name"], 0) + value
        elif name == "synapse_util_caches_cache_hits" and "name" in labels:
            m["hits"][labels["name"]] = m["hits"].get(labels["name"], 0) + value
    return m


def pg_stats(topo: workers.WorkerStack) -> dict[str, int]:
    conn = topo.postgres._connect("synapse")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT xact_commit, tup_returned, tup_fetched FROM pg_stat_database"
                " WHERE datname = 'synapse'"
            )
            xact, returned, fetched = cur.fetchone()
    finally:
        conn.close()
    return {"xact_commit": xact, "tup_returned": returned, "tup_fetched": fetched}


@dataclasses.dataclass
class Snapshot:
    workers: dict[str, dict]
    pg: dict[str, int]
    log_sizes: dict[str, int]


def snapshot(topo: workers.WorkerStack) -> Snapshot:
    pool = topo.pool("sync")
    with concurrent.futures.ThreadPoolExecutor(len(pool)) as ex:
        metrics = dict(zip([w.name for w in pool], ex.map(worker_metrics, pool), strict=True))
    sizes = {w.name: w.log.stat().st_size if w.log.exists() else 0 for w in pool}
    return Snapshot(metrics, pg_stats(topo), sizes)


def count_waits(topo: workers.WorkerStack, since: dict[str, int]) -> tuple[int, int]:
    """(waits, timeouts): catch-up waits the workers logged since the given log sizes."""
    waits = timeouts = 0
    for w in topo.pool("sync"):
        with w.log.open("rb") as f:
            f.seek(since.get(w.name, 0))
            text = f.read().decode(errors="replace")
        waits += text.count(WAITING)
        timeouts += text.count(WAIT_TIMED_OUT)
    return waits, timeouts


def background_updates(topo: workers.WorkerStack) -> int:
    """Synapse's background updates still to run (a fresh database starts with some)."""
    conn = topo.postgres._connect("synapse")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM background_updates")
            return cur.fetchone()[0]
    finally:
        conn.close()


def wait_for_background_updates(topo: workers.WorkerStack, timeout: float = 300) -> None:
    """Let the main process finish its background updates before anything is measured: their
    table scans would land in PostgreSQL's counters in whichever window they run."""
    t = time.monotonic()
    left = background_updates(topo)
    while left and time.monotonic() - t < timeout:
        log(f"waiting for Synapse's background updates: {left} left")
        time.sleep(5)
        left = background_updates(topo)
    if left:
        log(
            f"{left} background updates still running after {timeout:.0f}s: PostgreSQL's "
            "counters include them"
        )


def restart_sync_workers(topo: workers.WorkerStack) -> float:
    """Stop every sync worker, start them again, wait until each answers /health."""
    t = time.monotonic()
    pool = topo.pool("sync")
    with concurrent.futures.ThreadPoolExecutor(len(pool)) as ex:
        list(ex.map(lambda w: w.stop(), pool))
    for w in pool:
        w.launch()
    for w in pool:
        w.wait_ready()
    # Every worker's metrics answer (its replication connection is up by then too).
    for w in pool:
        wait_until(lambda w=w: worker_metrics(w)["cpu_s"] > 0, 60, f"{w.name} metrics")
    return time.monotonic() - t


# --------------------------------------------------------------------------------------------
# one window


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def figures(
    pop, before: Snapshot, after: Snapshot, load: synapse_load.WindowLoad, waits: tuple[int, int]
) -> dict:
    """The window's figures (before → after deltas; notifier users: the gauge at the end)."""
    names = list(after.workers)

    def delta(key: str, name: str) -> float:
        return after.workers[name][key] - before.workers[name][key]

    syncs = {n: delta("sync_responses", n) for n in names}
    txn = sum(delta("sync_db_txn", n) for n in names)
    cpu = sum(delta("cpu_s", n) for n in names)
    queries = sum(delta("queries", n) for n in names)
    notifier = {n: after.workers[n]["notifier_users"] for n in names}
    misses: dict[str, float] = {}
    for n in names:
        a, b = after.workers[n], before.workers[n]
        for cache, lookups in a["lookups"].items():
            miss = (lookups - a["hits"].get(cache, 0)) - (
                b["lookups"].get(cache, 0) - b["hits"].get(cache, 0)
            )
            if miss:
                misses[cache] = misses.get(cache, 0) + miss
    d = load.delivered or float("nan")
    n_users = len(pop.users)
    mean_syncs = sum(syncs.values()) / len(names)
    mean_notifier = sum(notifier.values()) / len(names)
    return {
        "valid": load.missing == 0 and load.send_errors == 0 and load.delivered > 0,
        "messages": len(load.sent),
        "expected": load.expected,
        "delivered": load.delivered,
        "missing": load.missing,
        "send_errors": load.send_errors,
        "sync_errors": load.errors,
        "client_syncs": load.syncs,
        "reconnect_s": round(load.reconnect_s, 2),
        "notifier_users": sum(notifier.values()),
        "notifier_per_user": sum(notifier.values()) / n_users,
        "notifier_by_worker": notifier,
        "worker_syncs": sum(syncs.values()),
        "syncs_by_worker": syncs,
        "db_txn_per_sync": txn / sum(syncs.values()) if sum(syncs.values()) else float("nan"),
        "worker_queries_per_delivery": queries / d,
        "pg_xact_per_delivery": (after.pg["xact_commit"] - before.pg["xact_commit"]) / d,
        "pg_tup_returned_per_delivery": (after.pg["tup_returned"] - before.pg["tup_returned"]) / d,
        "cpu_s": cpu,
        "cpu_ms_per_delivery": cpu * 1000 / d,
        "cache_misses": misses,
        "latency_p50_ms": pct(load.latencies_ms, 0.5),
        "latency_p99_ms": pct(load.latencies_ms, 0.99),
        "waits": waits[0],
        "wait_timeouts": waits[1],
        "sync_spread": max(syncs.values()) / mean_syncs if mean_syncs else float("nan"),
        "notifier_spread": max(notifier.values()) / mean_notifier
        if mean_notifier
        else float("nan"),
    }


async def _window_load(
    pop, envoy: Envoy, main_port: int, tag: str, args, measure_from, seconds: float
) -> tuple[Snapshot, synapse_load.WindowLoad, Snapshot]:
    """Reconnect, long-poll, send for `seconds`, drain. `measure_from` "reconnect" (cold) takes
    the first snapshot before the reconnect, "polls" (steady) once the long-polls wait."""
    loop = asyncio.get_running_loop()
    topo = args.topo

    async def snap() -> Snapshot:
        await asyncio.sleep(PG_SETTLE_S)
        return await loop.run_in_executor(None, snapshot, topo)

    async with synapse_load.Clients(pop, envoy.port, main_port, tag) as clients:
        if measure_from == "reconnect":
            before = await snap()
        await clients.reconnect(args.reconnect_concurrency)
        clients.start_polls()
        if measure_from != "reconnect":
            before = await snap()
        await clients.send(max(1, round(seconds * args.rate)), args.rate)
        await clients.drain(args.drain)
        load = clients.result()
        after = await snap()  # the long-polls are still waiting: their notifier streams count
    return before, load, after


def run_window(args, pop, policy: str, window: str, round_: int) -> dict:
    topo = args.topo
    name = f"r{round_}-{policy}-{window}"
    envoy = envoy_for(topo, policy, name)
    t = time.monotonic()
    envoy.start()
    try:
        log(
            f"  {window}: Envoy started ({time.monotonic() - t:.1f}s); reconnecting "
            f"{len(pop.devices)} devices ({args.reconnect_concurrency} at a time), then "
            f"{args.seconds[window]}s of messages at {args.rate}/s"
        )
        before, load, after = asyncio.run(
            _window_load(
                pop,
                envoy,
                topo.main.main_port,
                f"bench-{name}",
                args,
                "reconnect" if window == "cold" else "polls",
                args.seconds[window],
            )
        )
        waits = count_waits(topo, before.log_sizes)
        fig = figures(pop, before, after, load, waits)
        if policy == "user":
            time.sleep(1.2)  # the filter flushes its counters every second
            fig["filter"] = filter_counters(envoy)
    finally:
        envoy.stop()
    fig.update(policy=policy, window=window, round=round_)
    log(
        f"  {window}: {fig['delivered']}/{fig['expected']} deliveries"
        f"{'' if fig['valid'] else ' — INVALID'}; notifier users/user "
        f"{fig['notifier_per_user']:.2f}; db txn/sync {fig['db_txn_per_sync']:.2f}; "
        f"PG tup_returned/delivery {fig['pg_tup_returned_per_delivery']:.0f}; "
        f"latency p50 {fig['latency_p50_ms']:.0f} ms p99 {fig['latency_p99_ms']:.0f} ms; "
        f"waits {fig['waits']}" + (f"; filter {fig['filter']}" if "filter" in fig else "")
    )
    return fig


# --------------------------------------------------------------------------------------------
# the run


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wasm", type=Path, default=DEFAULT_WASM)
    ap.add_argument("--quick", action="store_true", help="a pilot of a few minutes")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the CI run: 6 users, one short cold window per policy, no report",
    )
    ap.add_argument("--users", type=int)
    ap.add_argument("--devices", type=int, help="devices (logins) per user")
    ap.add_argument("--rooms", type=int)
    ap.add_argument("--workers", type=int, default=4, help="sync workers")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--cold", type=float, help="seconds of messages in the cold window")
    ap.add_argument(
        "--steady", type=float, help="seconds of messages in the steady window (0: none)"
    )
    ap.add_argument(
        "--rate", type=float, default=1.0, help="messages per second (all rooms together)"
    )
    ap.add_argument(
        "--drain",
        type=float,
        default=20.0,
        help="seconds to wait for the last messages to reach every device",
    )
    ap.add_argument(
        "--reconnect-concurrency",
        type=int,
        default=16,
        help="devices reconnecting at once (below the filter's max_whoami_in_flight)",
    )
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    ap.add_argument("--plot", type=Path, default=BENCH / "synapse.svg")
    ap.add_argument("--json", type=Path, help="also write every figure as JSON")
    ap.add_argument(
        "--no-report", action="store_true", help="write neither BENCHMARKS.md nor the plot"
    )
    args = ap.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "quick" if args.quick else "default"]
    for k, v in size.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.smoke:
        args.no_report = True
    args.policies = [p for p in args.policies.split(",") if p]
    bad = set(args.policies) - set(POLICIES)
    if bad or not args.policies:
        ap.error(f"--policies: unknown {sorted(bad)}; known: {', '.join(POLICIES)}")
    for k in ("users", "devices", "rooms", "workers", "rounds", "reconnect_concurrency"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.cold <= 0 or args.steady < 0:
        ap.error("--rate and --cold must be positive, --steady at least 0")
    args.seconds = {"cold": args.cold, "steady": args.steady}
    args.windows = [w for w in WINDOWS if args.seconds[w] > 0]
    return args


def versions() -> dict[str, str]:
    """What the run ran on: commits, Synapse, PostgreSQL, Envoy, cores."""

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "unknown"
    if out(["git", "-C", str(REPO), "status", "--porcelain", "--", "bench", "tests", "envoy.yaml"]):
        commit += " (with uncommitted changes)"
    pg = re.search(r"\d+\.\d+", out([workers.pg_binary("postgres"), "--version"]))
    return {
        "commit": commit,
        "filter_commit": git_describe(),
        "synapse": importlib.metadata.version("matrix-synapse"),
        "postgres": pg[0] if pg else "unknown",
        "envoy": envoy_version(Path(venv_bin("envoy"))),
        "cpus": str(os.cpu_count()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    stop_on_termination()
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    log(
        f"bench-synapse: {args.users} users × {args.devices} devices, {args.rooms} rooms, "
        f"{args.workers} sync workers, {args.rounds} round(s) of {', '.join(args.policies)}; "
        f"windows {', '.join(f'{w} {args.seconds[w]:g}s' for w in args.windows)} at "
        f"{args.rate:g} messages/s"
    )
    try:
        topo = workers.WorkerStack(
            args.wasm, pools={"sync": args.workers}, prefix="bench-synapse-", metrics=True
        )
    except workers.MissingDependency as exc:
        log(f"cannot run: {exc} (`just worker-deps` installs PostgreSQL and Redis)")
        return 2
    args.topo = topo
    results: list[dict] = []
    failed = True
    try:
        log(f"starting PostgreSQL, Redis, Synapse main and {args.workers} sync workers")
        log(f"work folder: {topo.dir}")
        # Deterministic database counters: no autovacuum, background updates run at once.
        topo.postgres.extra_settings = ["autovacuum=off"]
        topo.main.extra_config["background_updates"] = {"sleep_enabled": False}
        topo.start()
        log(f"topology up: {topo.timings}")
        pop = asyncio.run(
            synapse_load.populate(topo.main, args.users, args.devices, args.rooms, log)
        )
        wait_for_background_updates(topo)
        for r in range(args.rounds):
            k = r % len(args.policies)
            order = args.policies[k:] + args.policies[:k]
            log(f"round {r + 1}/{args.rounds}: {' → '.join(order)}")
            for policy in order:
                restart_s = restart_sync_workers(topo)
                log(f" {policy}: sync workers restarted ({restart_s:.1f}s)")
                for window in args.windows:
                    results.append(run_window(args, pop, policy, window, r + 1))
        failed = False
    finally:
        topo.close(keep_dir=failed)
        if failed:
            log(f"failed: logs kept in {topo.dir}")
    elapsed = time.monotonic() - started
    meta = {
        "started": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(elapsed),
        "load_start": load_start,
        "load_end": Path("/proc/loadavg").read_text().split()[:3],
        "users": args.users,
        "devices": args.devices,
        "rooms": args.rooms,
        "workers": args.workers,
        "rounds": args.rounds,
        "rate": args.rate,
        "seconds": args.seconds,
        "policies": args.policies,
        "windows": args.windows,
        "reconnect_concurrency": args.reconnect_concurrency,
        "room_sizes": sorted(len(m) for m in pop.rooms.values()),
        "quick": args.quick,
        "smoke": args.smoke,
        **versions(),
    }
    log(f"done in {elapsed:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "windows": results}, indent=1))
    if not args.no_report:
        from msrbench import synapse_report

        synapse_report.write(meta, results, args.out, args.plot)
        log(f'wrote {args.out} (section "{synapse_report.TITLE}") and {args.plot}')
    invalid = [f"{w['policy']} {w['window']} round {w['round']}" for w in results if not w["valid"]]
    if invalid:
        log(f"INVALID windows (a device missed messages or a send failed): {invalid}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
