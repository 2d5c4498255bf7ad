"""BENCHMARKS.md's section "What routing by user saves Synapse" and bench/synapse.svg, from the
figures of `just bench-synapse` (synapse_bench.py). Every figure is the median over rounds, with
the min–max in brackets; ratios are taken within each round first."""

from __future__ import annotations

import math
import os
import statistics
from html import escape
from pathlib import Path

from msrbench import plot

TITLE = "What routing by user saves Synapse"
BEGIN = "<!-- bench-synapse: begin (written by `just bench-synapse`; `just bench` keeps it) -->"
END = "<!-- bench-synapse: end -->"
NAMES = {"user": "user (filter)", "token": "token", "round_robin": "round robin"}

# Synapse's caches by what they are keyed by (read from Synapse 1.163's storage code).
PER_USER = [
    "get_rooms_for_user",
    "get_unread_event_push_actions_by_room_for_user",
    "get_global_account_data_by_type_for_user",
    "get_global_account_data_for_user",
    "get_account_data_for_room_and_type",
    "get_tags_for_user",
    "ignored_users",
    "get_push_rules_for_user",
    "get_push_rules_enabled_for_user",
    "get_user_filter",
    "get_user_locked_status",
    "is_support_user",
    "is_server_admin",
    "get_ratelimit_for_user",
    "is_feature_enabled",
]
PER_DEVICE = [
    "get_user_by_access_token",
    "mark_access_token_as_used",
    "client_ip_last_seen",
    "lazy_loaded_members_cache",
    "count_e2e_one_time_keys",
    "get_e2e_unused_fallback_key_types",
    "last_device_delete_cache",
]

# The rows of the main table: key | format | "count" or "timing" | label.
_ROWS = """
notifier_per_user | {:.2f} | count | notifier user streams per active user (all workers)
db_txn_per_sync | {:.2f} | count | database transactions per incremental /sync
worker_queries_per_delivery | {:.1f} | count | SQL statements by the sync workers per delivery
pg_xact_per_delivery | {:.1f} | count | PostgreSQL xact_commit per delivery
pg_tup_returned_per_delivery | {:.0f} | count | PostgreSQL tup_returned per delivery
per_user_misses_per_user | {:.1f} | count | misses in per-user caches per active user
per_device_misses_per_user | {:.1f} | count | misses in per-device caches per active user
waits | {:.0f} | count | requests that waited for a worker to catch up (log lines)
sync_spread | {:.2f} | count | busiest worker's /sync count ÷ mean
notifier_spread | {:.2f} | count | busiest worker's notifier streams ÷ mean
cpu_ms_per_delivery | {:.1f} | timing | sync workers' CPU ms per delivery (noisy)
latency_p50_ms | {:.0f} | timing | delivery latency p50, ms (noisy)
latency_p99_ms | {:.0f} | timing | delivery latency p99, ms (noisy)
"""
ROWS = [
    (key, label, fmt, kind)
    for key, fmt, kind, label in (
        [part.strip() for part in line.split("|")] for line in _ROWS.strip().splitlines()
    )
]


def med(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def derive(w: dict, n_users: int) -> dict:
    """Figures computed from a window's raw ones (per-user and per-device cache misses)."""
    misses = w["cache_misses"]
    w = dict(w)
    w["per_user_misses_per_user"] = sum(misses.get(c, 0) for c in PER_USER) / n_users
    w["per_device_misses_per_user"] = sum(misses.get(c, 0) for c in PER_DEVICE) / n_users
    return w


class Figures:
    def __init__(self, meta: dict, windows: list[dict]):
        self.meta = meta
        self.windows = [derive(w, meta["users"]) for w in windows]
        self.policies = meta["policies"]

    def of(self, policy: str, window: str) -> list[dict]:
        return [w for w in self.windows if w["policy"] == policy and w["window"] == window]

    def values(self, policy: str, window: str, key: str) -> list[float]:
        return [w[key] for w in self.of(policy, window) if w["valid"]]

    def cell(self, policy: str, window: str, key: str, fmt: str) -> str:
        xs = self.values(policy, window, key)
        if not xs:
            return "—"
        m, lo, hi = med(xs), min(xs), max(xs)
        if len(xs) == 1 or fmt.format(lo) == fmt.format(hi):
            return fmt.format(m)
        return f"{fmt.format(m)} ({fmt.format(lo)}–{fmt.format(hi)})"

    def ratios(self, policy: str, window: str, key: str) -> list[float]:
        """Per round: policy's value ÷ user's."""
        mine = {w["round"]: w[key] for w in self.of(policy, window) if w["valid"]}
        base = {w["round"]: w[key] for w in self.of("user", window) if w["valid"]}
        return [mine[r] / base[r] for r in sorted(mine) if base.get(r)]

    def ratio_cell(self, policy: str, window: str, key: str) -> str:
        xs = self.ratios(policy, window, key)
        if not xs:
            return "—"
        m, lo, hi = med(xs), f"{min(xs):.2f}", f"{max(xs):.2f}"
        return f"{m:.2f}×" if lo == hi else f"{m:.2f}× ({lo}–{hi})"


def main_table(f: Figures, window: str) -> str:
    others = [p for p in f.policies if p != "user"]
    head = ["figure", *[NAMES[p] for p in f.policies]]
    if "user" in f.policies:
        head += [f"{NAMES[p]} ÷ user" for p in others]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for key, label, fmt, _ in ROWS:
        cells = [f.cell(p, window, key, fmt) for p in f.policies]
        if "user" in f.policies:
            cells += [f.ratio_cell(p, window, key) if "spread" not in key else "" for p in others]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cache_table(f: Figures) -> str:
    """Cold-window misses by cache, per active user, for the per-user and per-device caches."""
    names = [
        c
        for c in PER_USER + PER_DEVICE
        if any(w["cache_misses"].get(c) for w in f.windows if w["window"] == "cold")
    ]
    head = ["cache", "keyed by", *[NAMES[p] for p in f.policies]]
    lines = ["| " + " | ".join(head) + " |", "|---|---" + "|---:" * len(f.policies) + "|"]
    n = f.meta["users"]
    for c in names:
        cells = []
        for p in f.policies:
            xs = [w["cache_misses"].get(c, 0) / n for w in f.of(p, "cold") if w["valid"]]
            cells.append(f"{med(xs):.2f}" if xs else "—")
        kind = "user" if c in PER_USER else "device"
        lines.append(f"| `{c}` | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sanity_table(f: Figures) -> str:
    lines = [
        "| policy | window | rounds valid | deliveries (all rounds) | missing | /sync errors |"
        " filter fallbacks / shed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in f.policies:
        for win in f.meta["windows"]:
            ws = f.of(p, win)
            fb = [
                f"{w['filter']['fallbacks']} / {w['filter']['shed']}" for w in ws if "filter" in w
            ] or ["(no filter)"]
            lines.append(
                f"| {NAMES[p]} | {win} | {sum(w['valid'] for w in ws)}/{len(ws)} | "
                f"{sum(w['delivered'] for w in ws):,} of {sum(w['expected'] for w in ws):,} | "
                f"{sum(w['missing'] for w in ws)} | {sum(w['sync_errors'] for w in ws)} | "
                f"{', '.join(dict.fromkeys(fb))} |"
            )
    return "\n".join(lines) + "\n"


def _m(f: Figures, policy: str, window: str, key: str) -> float:
    return med(f.values(policy, window, key))


def _r(f: Figures, policy: str, window: str, key: str) -> float:
    return med(f.ratios(policy, window, key))


def expected_streams(devices: int, workers: int) -> float:
    """Distinct workers a user's devices land on when each is placed at random (routing by
    token): workers × (1 - (1 - 1/workers)^devices)."""
    return workers * (1 - (1 - 1 / workers) ** devices)


def reading(f: Figures) -> list[str]:
    """The run's findings as sentences, each quoting its figures (only what this run shows)."""
    pols = f.policies
    if not {"user", "token", "round_robin"} <= set(pols):
        return ["(not every policy ran: no comparison)"]
    m = f.meta
    out = []
    for win in m["windows"]:
        n = [_m(f, p, win, "notifier_per_user") for p in ("user", "token", "round_robin")]
        out.append(
            f"**{win}**: notifier streams per user {n[0]:.2f} / {n[1]:.2f} / {n[2]:.2f} (user / "
            f"token / round robin; random placement of {m['devices']} devices on "
            f"{m['workers']} workers predicts {expected_streams(m['devices'], m['workers']):.2f} "
            f"by token, and round robin reaches every worker: {m['workers']}). "
            f"Database transactions per /sync {_r(f, 'token', win, 'db_txn_per_sync'):.2f}× and "
            f"{_r(f, 'round_robin', win, 'db_txn_per_sync'):.2f}× user's; the sync workers' SQL "
            f"statements per delivery {_r(f, 'token', win, 'worker_queries_per_delivery'):.2f}× "
            f"and {_r(f, 'round_robin', win, 'worker_queries_per_delivery'):.2f}×; PostgreSQL "
            f"rows read (tup_returned) per delivery "
            f"{_r(f, 'token', win, 'pg_tup_returned_per_delivery'):.2f}× and "
            f"{_r(f, 'round_robin', win, 'pg_tup_returned_per_delivery'):.2f}×."
        )
    dev_u = _m(f, "user", "cold", "per_device_misses_per_user")
    dev_t = _m(f, "token", "cold", "per_device_misses_per_user")
    dev_rr = _m(f, "round_robin", "cold", "per_device_misses_per_user")
    cold_t = [w for w in f.of("token", "cold") if w["valid"]]
    cold_u = [w for w in f.of("user", "cold") if w["valid"]]
    extra = {
        c: med([w["cache_misses"].get(c, 0) for w in cold_t])
        - med([w["cache_misses"].get(c, 0) for w in cold_u])
        for c in PER_USER
    }
    top = max(extra, key=lambda c: extra[c])
    total = sum(x for x in extra.values() if x > 0) or 1

    def per_user(policy: str) -> float:
        return _m(f, policy, "cold", "per_user_misses_per_user")

    same = "equal" if abs(dev_u - dev_t) <= 0.02 * max(dev_u, dev_t, 1e-9) else "not equal"
    out.append(
        f"**Where user and token are {same}**: per-device caches (access token, client IP, "
        f"lazy-loaded members, one-time-key counts) missed {dev_u:.1f} times per user under user "
        f"and {dev_t:.1f} under token in the cold window, {dev_rr:.1f} under round robin. "
        f"Routing by token keeps a device's state as well as routing by user does; what it loses "
        f"is the per-user state: per-user caches missed {per_user('user'):.1f} / "
        f"{per_user('token'):.1f} / {per_user('round_robin'):.1f} times per user; of the "
        f"misses token added over user, `{top}` made the largest share "
        f"({extra[top] / total:.0%})."
    )
    waits = sum(w["waits"] for w in f.windows)
    if waits == 0:
        out.append(
            "**Catch-up waits**: no worker logged a wait in any window, not even under "
            "round robin: at this load replication kept every worker current, so a device "
            "moving between workers cost cache misses, not waiting."
        )
    else:
        per = {p: sum(w["waits"] for w in f.windows if w["policy"] == p) for p in pols}
        out.append(
            "**Catch-up waits** (all windows and rounds): "
            + ", ".join(f"{NAMES[p]} {per[p]}" for p in pols)
            + "."
        )
    last = m["windows"][-1]
    spread = {p: _m(f, p, last, "sync_spread") for p in pols}
    lumpy = "" if spread["user"] > spread["token"] else "; by user no lumpier than by token here"
    out.append(
        f"**Placement**: the busiest worker served {spread['user']:.2f}× the mean number of /sync "
        f"requests by user, {spread['token']:.2f}× by token and {spread['round_robin']:.2f}× "
        f"round robin ({m['users']} users{lumpy}). Hashing places whole users (by user) or "
        f"devices (by token), so a few more or fewer on one worker shows here; round robin spreads "
        f"requests evenly but puts every user on every worker."
    )
    lo = min(w["pg_tup_returned_per_delivery"] for w in f.windows if w["valid"])
    hi = max(w["pg_tup_returned_per_delivery"] for w in f.windows if w["valid"])
    out.append(
        f"**PostgreSQL's counters** cover the whole database, the main process's sends and its "
        f"periodic jobs included, so they vary between rounds more than the workers' own counts "
        f"(tup_returned per delivery {lo:.0f}–{hi:.0f} over all windows); the per-round ratios "
        f"are the figure to read there."
    )
    out.append(
        f"**Timings (noisy)**: the sync workers' CPU per delivery was "
        f"{_r(f, 'token', 'cold', 'cpu_ms_per_delivery'):.2f}× / "
        f"{_r(f, 'round_robin', 'cold', 'cpu_ms_per_delivery'):.2f}× user's in the cold window"
        + (
            f" and {_r(f, 'token', 'steady', 'cpu_ms_per_delivery'):.2f}× / "
            f"{_r(f, 'round_robin', 'steady', 'cpu_ms_per_delivery'):.2f}× in the steady one"
            if "steady" in m["windows"]
            else ""
        )
        + "; delivery latency p50 "
        + " / ".join(f"{_m(f, p, m['windows'][-1], 'latency_p50_ms'):.0f}" for p in pols)
        + f" ms (user / token / round robin). The load average went from "
        f"{m['load_start'][0]} to {m['load_end'][0]} during the run: these are not the result."
    )
    return out


def headline(f: Figures) -> str:
    """README's two lines (the steady window's counts)."""
    m = f.meta
    win = "steady" if "steady" in m["windows"] else "cold"
    n = [_m(f, p, win, "notifier_per_user") for p in ("user", "token", "round_robin")]
    return (
        f"Measured on real Synapse workers ({m['users']} users × {m['devices']} devices, "
        f"{m['workers']} sync workers; {m['started'][:10]}, commit {m['commit']}): routing by user "
        f"keeps {n[0]:.2f} notifier stream per user against {n[1]:.2f} by token and {n[2]:.2f} "
        f"round robin, and the sync workers run "
        f"{_r(f, 'token', win, 'worker_queries_per_delivery'):.2f}× / "
        f"{_r(f, 'round_robin', win, 'worker_queries_per_delivery'):.2f}× as many SQL "
        f"statements per delivered message by token / round robin as by user "
        f"([{TITLE}](BENCHMARKS.md#what-routing-by-user-saves-synapse))."
    )


def section(f: Figures, plot_ref: str | None) -> str:
    m = f.meta
    kind = ""
    if m.get("smoke"):
        kind = " **Smoke run: the figures mean nothing.**"
    elif m.get("quick"):
        kind = " **`--quick` pilot: one short round, not the default size.**"
    windows = ", ".join(f"{w} {m['seconds'][w]:g} s" for w in m["windows"])
    picture = f"\n![bench-synapse]({plot_ref})\n" if plot_ref else ""
    steady = main_table(f, "steady") if "steady" in m["windows"] else "(not run)\n"
    findings = "\n".join(f"- {line}" for line in reading(f))
    return f"""{BEGIN}
## {TITLE}

Written by `just bench-synapse` (bench/synapse_bench.py) on {m["started"]} at commit
{m["commit"]} (filter source {m["filter_commit"]}); the run took {m["elapsed_s"]} s.{kind}
Load average {" ".join(m["load_start"])} at the start, {" ".join(m["load_end"])} at the end, on
{m["cpus"]} cores shared with other jobs. Synapse {m["synapse"]} (PyPI), PostgreSQL
{m["postgres"]}, Envoy {m["envoy"]}.

**Method.** PostgreSQL, Redis, the Synapse main process and {m["workers"]} `generic_worker` sync
workers on 127.0.0.1 (tests/msrtest/workers.py, `enable_metrics` and a metrics listener per worker),
Envoy in front. {m["users"]} users × {m["devices"]} devices (each device its own login and
token), {len(m["room_sizes"])} public rooms of {min(m["room_sizes"])}–{max(m["room_sizes"])}
members (joined, not invited; every user in two), one Element-like filter per user
(`lazy_load_members`, timeline limit 20), push rules as Synapse creates them, presence off.
PostgreSQL runs without autovacuum and the bench waits for Synapse's background updates before
the first round, so no scan outside the load lands in the database counters.
Three policies for the sync routes, side by side in one run:

- **user**: envoy.yaml as shipped (the filter; MAGLEV on the user ID it sets);
- **token**: no filter, MAGLEV on the `Authorization` header (per device: ess-helm's HAProxy);
- **round robin**: no filter, `ROUND_ROBIN` (no stickiness).

{m["rounds"]} round(s), the policy order rotated every round. Before each policy the sync workers
are restarted, so none inherits another's caches; then two windows, each with a freshly started
Envoy: **cold** (measured from right after the restart: every device's reconnect, one
`timeout=0` incremental sync, at most {m["reconnect_concurrency"]} at once, then long-polls and
messages) and **steady** (measured once the devices are long-polling again through the next
Envoy; the paced reconnect has filled the filter's token cache below its
`max_whoami_in_flight`, so no user is split by a cold proxy). Windows: {windows} of messages at
{m["rate"]:g}/s, sent straight to the main process round robin over the rooms by their members
in turn; every device long-polls `/sync` (`since`, `timeout=30000`) through Envoy on its own
keep-alive connection (aiohttp: a plain-HTTP client keeps the load generator's own CPU small
on two shared cores). A window counts only if every device saw every message of its rooms.

Figures, all from Synapse's own metrics, logs and PostgreSQL: **notifier user streams**
(`synapse_notifier_users` summed over the workers at the window's end ÷ users);
**transactions per /sync** (`synapse_http_server_response_db_txn_count_total` ÷
`synapse_http_server_response_count_total`, `servlet="SyncRestServlet"`, all workers);
**SQL statements** (the sync workers' `synapse_storage_query_time_count` ÷ deliveries);
**xact_commit / tup_returned** (`pg_stat_database` deltas for Synapse's database, the main
process included, ÷ deliveries; a delivery is one message reaching one device); **cache misses**
(`synapse_util_caches_cache` minus `synapse_util_caches_cache_hits` deltas); **waits** (the workers'
"Waiting for this worker's streams to advance" log lines: a request whose `since` the worker had
not reached yet); **CPU** (`process_cpu_seconds_total` of the sync workers); **latency** (send →
first seen by each device, measured by the client). Median over rounds, min–max in brackets; the
÷ user columns are per-round ratios.

**Reading.** The counts (streams, transactions, statements, rows, misses, waits) are properties
of the routing and come out the same on a quiet or a busy machine: they are the result. CPU and
latency are timings on two cores shared with other jobs: they drift over the run more than between
policies, so read them as direction only. What this run shows:

{findings}
{picture}
### Cold window (right after the workers restart)

{main_table(f, "cold")}
### Steady window

{steady}
### Cold-window cache misses by cache (per active user)

Per-user caches are filled once per worker that serves the user; per-device caches once per
worker that serves the device, so routing by user and by token fill them alike, and round robin
fills them on every worker. Room- and event-keyed caches (`*getEvent*`, state groups, stream
change caches) reach every worker whatever the routing and are left out.

{cache_table(f)}
### Sanity

{sanity_table(f)}
{END}
"""


def replace_section(existing: str, new_section: str, begin: str = BEGIN, end: str = END) -> str:
    """`existing` with the section between `begin` and `end` (by default bench-synapse's)
    replaced by `new_section`, or `new_section` appended."""
    if begin in existing and end in existing:
        head, _, rest = existing.partition(begin)
        _, _, tail = rest.partition(end)
        return head + new_section.rstrip("\n") + tail
    return existing.rstrip("\n") + "\n\n" + new_section


def keep_section(out: Path, text: str, begin: str = BEGIN, end: str = END) -> str:
    """For a run that rewrites BENCHMARKS.md: `text` plus the section between `begin` and `end`
    (by default bench-synapse's) that the file already has."""
    try:
        old = out.read_text()
    except FileNotFoundError:
        return text
    if begin not in old or end not in old:
        return text
    kept = begin + old.partition(begin)[2].partition(end)[0] + end + "\n"
    return replace_section(text, kept, begin, end)


# --------------------------------------------------------------------------------------------
# the plot

COLOURS = {"user": "#4c78a8", "token": "#f58518", "round_robin": "#e45756"}
SVG_ROWS = [r for r in ROWS if r[0] not in ("sync_spread", "notifier_spread")]


def svg(f: Figures) -> str:
    width, left, right, bar = 900, 330, 120, 9
    plot_w = width - left - right
    parts = []
    y = 0
    for window in f.meta["windows"]:
        parts.append(
            plot._text(
                10,
                y + 18,
                f"{window} window: each figure relative to the "
                f"largest policy (bar: median over rounds; label: value)",
                14,
                weight="bold",
            )
        )
        y += 30
        for key, label, fmt, kind in SVG_ROWS:
            vals = {p: med(f.values(p, window, key)) for p in f.policies}
            top = max([v for v in vals.values() if not math.isnan(v)], default=0) or 1
            parts.append(plot._text(left - 8, y + 4 + bar * len(vals) / 2, label, 11, "end"))
            for i, (p, v) in enumerate(vals.items()):
                yy = y + i * bar
                if math.isnan(v):
                    continue
                w = plot_w * v / top
                opacity = "0.45" if kind == "timing" else "0.9"
                parts.append(
                    f'<rect x="{left}" y="{yy:.1f}" width="{w:.1f}" height="{bar - 1}" '
                    f'fill="{COLOURS[p]}" opacity="{opacity}"/>'
                )
                parts.append(plot._text(left + w + 4, yy + bar - 1, fmt.format(v), 9))
            y += bar * len(vals) + 10
        y += 10
    parts.append(plot._text(10, y + 14, "counts solid, timings (noisy) pale", 11))
    x = 260
    for p in f.policies:
        parts.append(
            f'<text x="{x}" y="{y + 14}" font-size="11" fill="{COLOURS[p]}">'
            f"{escape('■ ' + NAMES[p])}</text>"
        )
        x += 140
    y += 30
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y:.0f}" '
        f'viewBox="0 0 {width} {y:.0f}" font-family="sans-serif">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n"
    )


def write(meta: dict, windows: list[dict], out: Path, plot_path: Path) -> Figures:
    f = Figures(meta, windows)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_path.write_text(svg(f))
    ref = os.path.relpath(plot_path, out.parent)
    try:
        existing = out.read_text()
    except FileNotFoundError:
        existing = "# Benchmarks\n"
    out.write_text(replace_section(existing, section(f, ref)))
    return f
