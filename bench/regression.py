"""`just bench-regression [REV]`: the cache-hit path of this build against an earlier one.

The cost phase of `just bench` (msrbench.run.cpu_phase: Envoy CPU per request, interleaved
rounds, the order rotated every round) with four variants in one run:

  none       no filter
  hit        this build, every request a cache hit (route-metadata options off)
  hit_base   the module built at REV (the Justfile builds it), the same configuration
  hit_again  this build again in its own Envoy: an A/A control, whose spread is the run's noise

Per round: baseline ÷ current (hit_base's CPU per request ÷ hit's; below 1: this build costs
more) and A/A (hit_again's ÷ hit's). A regression is a baseline ÷ current median below the
smallest A/A ratio of the run: a slowdown larger than anything the noise produced between two
identical modules. Writes the section "Hit path against an earlier build" of BENCHMARKS.md
(`just bench` keeps it; this run keeps the others).
"""

from __future__ import annotations

import datetime as dt
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from msrbench import BenchError, configs, report, run
from msrbench.envoy import envoy_version
from msrbench.synapse_report import replace_section
from msrtest.env import REPO
from msrtest.procs import Children
from msrtest.synapse import Synapse

BEGIN = (
    "<!-- bench-regression: begin (written by `just bench-regression`; `just bench` keeps it) -->"
)
END = "<!-- bench-regression: end -->"
TITLE = "Hit path against an earlier build"

VARIANTS = [
    run.Variant("none", "none", run.SYNC_PATH, "no filter"),
    run.Variant("hit", "msr", run.SYNC_PATH, "this build, cache hit"),
    run.Variant("hit_base", "msr_hit_baseline", run.SYNC_PATH, "baseline build, cache hit"),
    run.Variant("hit_again", "msr_hit_msr", run.SYNC_PATH, "this build again (A/A control)"),
]
RATIOS = {
    "baseline ÷ current": ("hit_base", "hit"),
    "A/A: current again ÷ current": ("hit_again", "hit"),
}


def parse_args():
    ap = run.parser(__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-wasm", type=Path, required=True, help="the earlier build")
    ap.add_argument("--baseline-rev", default="unknown", help="the commit it was built from")
    ap.set_defaults(duration=4, phases="cost")
    args = run.parse_args(ap)
    args.phases = {"cost"}
    return args


def per_round(samples: list) -> dict[int, dict[str, float]]:
    by: dict[int, dict[str, float]] = {}
    for s in samples:
        by.setdefault(s.round, {})[s.variant] = s.cpu_us
    return by


def ratios(samples: list, a: str, b: str) -> list[float]:
    """Per round: a's CPU per request ÷ b's."""
    return [r[a] / r[b] for _, r in sorted(per_round(samples).items()) if a in r and b in r]


def verdict(samples: list) -> tuple[bool, str]:
    base = ratios(samples, *RATIOS["baseline ÷ current"])
    aa = ratios(samples, *RATIOS["A/A: current again ÷ current"])
    if not base or not aa:
        return False, "no complete round: nothing to judge"
    m, floor = report.med(base), min(aa)
    if m < floor:
        return True, (
            f"**regression**: baseline ÷ current median {m:.3f} is below the A/A minimum "
            f"{floor:.3f} (this build costs more than the run's noise explains)"
        )
    return False, (
        f"no regression beyond the run's noise: baseline ÷ current median {m:.3f} ≥ the A/A "
        f"minimum {floor:.3f} (A/A range {min(aa):.3f}–{max(aa):.3f}: differences inside it "
        "cannot be told apart by this run)"
    )


def summary_table(samples: list) -> str:
    lines = ["| ratio (per round) | median | min–max | rounds |", "|---|---:|---:|---:|"]
    for name, (a, b) in RATIOS.items():
        xs = ratios(samples, a, b)
        if xs:
            lines.append(
                f"| {name} | {report.med(xs):.3f} | {min(xs):.3f}–{max(xs):.3f} | {len(xs)} |"
            )
    return "\n".join(lines) + "\n"


def cost_table(samples: list) -> str:
    """Median µs per variant, and the filter's own cost (the variant minus `none`, per round)."""
    by = per_round(samples)
    lines = [
        "| variant | what | Envoy CPU µs/req, median (min–max) | + vs none, median |",
        "|---|---|---:|---:|",
    ]
    for v in VARIANTS:
        xs = [r[v.name] for r in by.values() if v.name in r]
        if not xs:
            continue
        added = [r[v.name] - r["none"] for r in by.values() if v.name in r and "none" in r]
        extra = "—" if v.name == "none" else f"{report.med(added):+.2f}"
        lines.append(f"| {v.name} | {v.what} | {spread(xs, '.2f')} | {extra} |")
    return "\n".join(lines) + "\n"


def spread(xs: list[float], fmt: str = ".3f") -> str:
    """Median (min–max)."""
    return f"{report.med(xs):{fmt}} ({min(xs):{fmt}}–{max(xs):{fmt}})"


def rounds_table(samples: list) -> str:
    by = per_round(samples)
    names = [v.name for v in VARIANTS]
    lines = [
        "| round | " + " | ".join(f"{n} µs" for n in names) + " | baseline ÷ current | A/A |",
        "|---:|" + "---:|" * (len(names) + 2),
    ]
    for k, r in sorted(by.items()):
        cells = [f"{r[n]:.2f}" if n in r else "" for n in names]
        rat = [f"{r[a] / r[b]:.3f}" if a in r and b in r else "" for a, b in RATIOS.values()]
        lines.append(f"| {k + 1} | " + " | ".join(cells + rat) + " |")
    return "\n".join(lines) + "\n"


def head_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def section(args, samples, problems, meta) -> str:
    checks = "all passed" if not problems else "FAILED: " + "; ".join(problems)
    _, judged = verdict(samples)
    return f"""{BEGIN}
## {TITLE}

Written by `just bench-regression {args.baseline_rev}` (bench/regression.py) on {meta["date"]}
at commit {meta["head"]} (filter source {meta["filter"]}); the run took {meta["elapsed"]:.0f} s.
Baseline: the filter built at {args.baseline_rev} as `just build` builds it (release,
wasm32-wasip1, wasm-opt), {meta["base_bytes"]:,} bytes; this build {meta["cur_bytes"]:,} bytes.
Envoy {meta["envoy"]}; load average {meta["load"][0]} at the start, {meta["load"][1]} at the end, on
cores shared with other jobs.

**Method.** The cost phase of `just bench` (see Method above: one Envoy per variant pinned to
core {args.envoy_cpu}, wrk on core {args.load_cpu}, {args.connections} connections, GET of the
sync path with {meta["tokens"]} real tokens warmed into every cache, no whoami call in any round)
with four variants: no filter, this build (`hit`, route-metadata options off), the baseline build
with the same configuration (`hit_base`), and this build again in its own Envoy (`hit_again`, an
A/A control). {args.rounds} rounds × {args.duration} s per variant after {args.warmup} s of
warm-up, the order rotated every round. Per round: **baseline ÷ current** = `hit_base`'s Envoy
CPU per request ÷ `hit`'s (above 1: this build is cheaper) and **A/A** = `hit_again`'s ÷ `hit`'s
(two identical modules: its spread is what the machine's noise does to a ratio in this run).

**Rule.** A regression is a baseline ÷ current median below the A/A run's minimum: this build
would then cost more than anything the noise produced between two identical modules. A
difference inside the A/A range is below what this run can resolve. Checks: {checks}.

**Judgement:** {judged}.

{summary_table(samples)}
{cost_table(samples)}
Every round (Envoy CPU µs per request):

{rounds_table(samples)}{END}
"""


def measure(args, modules: dict, children: Children, workdir: Path) -> int:
    started, load_before = time.monotonic(), report.loadavg()
    setup = run.Setup(
        args, children, workdir, configs.operator_wasm_filter(args.envoy_yaml), modules
    )
    sizes = f"current {args.wasm.stat().st_size:,} bytes, baseline ({args.baseline_rev}) "
    sizes += f"{args.baseline_wasm.stat().st_size:,} bytes"
    print(f"envoy {envoy_version(args.envoy)}; {sizes}; load average {load_before}", flush=True)
    synapse = Synapse(workdir / "synapse", n_workers=1).start()
    try:
        tokens = run.Tokens(synapse, 64)
        samples, problems, hit_tokens, _ = run.cpu_phase(setup, tokens, synapse.main_port, VARIANTS)
    finally:
        synapse.stop()
    print()
    for table in (summary_table, cost_table, rounds_table):
        print(table(samples))
    regressed, judged = verdict(samples)
    print(judged.replace("**", ""))
    if problems:
        print("CHECKS FAILED:\n  " + "\n  ".join(problems))
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "head": head_commit(),
        "filter": report.git_describe(),
        "elapsed": time.monotonic() - started,
        "base_bytes": args.baseline_wasm.stat().st_size,
        "cur_bytes": args.wasm.stat().st_size,
        "envoy": envoy_version(args.envoy),
        "load": (load_before, report.loadavg()),
        "tokens": len(hit_tokens),
    }
    if str(args.out) != "-":
        existing = args.out.read_text() if args.out.is_file() else "# Benchmarks\n"
        text = section(args, samples, problems, meta)
        args.out.write_text(replace_section(existing, text, BEGIN, END))
        print(f"wrote {args.out} (section {TITLE!r})")
    return 1 if problems or regressed else 0


def main() -> int:
    args = parse_args()
    modules = run.preflight(args)
    if not args.baseline_wasm.is_file():
        raise BenchError(f"{args.baseline_wasm} missing (`just bench-regression REV` builds it)")
    modules["baseline"] = args.baseline_wasm
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, run._raise_interrupt)
    children = Children(args.nice)
    workdir = Path(tempfile.mkdtemp(prefix="msr-regression-"))
    try:
        return measure(args, modules, children, workdir)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:  # every child stopped, then their work directory removed
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run.cli(main, "bench-regression")
