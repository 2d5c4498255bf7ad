"""`just bench --quick` runs end to end and reports every row (correctness only, never speed).

The benchmark itself is not part of `just test`; this smoke run makes sure it still works with
the current filter: every variant's Envoy starts and is measured, every cache was warmed and hit,
the latency and burst answers carried the right user, and the memory runs pushed their tokens
through. No figure is compared with a threshold: the machine running the tests is too noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from msrbench import regression, synapse_report
from msrtest.env import REPO, WASM

VARIANTS = [
    "none",
    "noop",
    "noop_envoy",
    "sdk_noop",
    "minimal",
    "lua",
    "hit",
    "hit_trusted",
    "hit_shipped",
    "opt_sync_kind",
    "opt_filter_state",
    "opt_no_masquerade",
    "opt_local_decode",
    "opt_mas_check",
    "room_off",
    "opt_room",
    "other_path",
    "other_off",
]


SYNAPSE_KEPT = f"{synapse_report.BEGIN}\n## kept: bench-synapse\n{synapse_report.END}"
REGRESSION_KEPT = f"{regression.BEGIN}\n## kept: bench-regression\n{regression.END}"


def _skip_reason() -> str | None:
    """Why the bench cannot run here (`just bench-tools` installs wrk and taskset)."""
    missing = [t for t in ("wrk", "taskset") if not shutil.which(t)]
    if missing:
        return f"{', '.join(missing)} not installed (`just bench-tools` could not install it)"
    if not {0, 1} <= os.sched_getaffinity(0):
        return (
            f"the bench needs cores 0 and 1, this process may use {sorted(os.sched_getaffinity(0))}"
        )
    return None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    # The sections other runs wrote must survive this one's rewrite of the file.
    (out / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\nold\n\n{SYNAPSE_KEPT}\n\n{REGRESSION_KEPT}\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msrbench.run",
            "--quick",
            "--wasm",
            str(WASM),
            "--out",
            str(out / "BENCHMARKS.md"),
            "--plot",
            str(out / "plot.svg"),
            "--json",
            str(out / "results.json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def test_every_variant_has_a_sane_cost(quick_run):
    _, _, results = quick_run
    rows = {r["variant"]: r for r in results["cost"]}
    assert list(rows) == VARIANTS
    for name, row in rows.items():
        assert row["cpu_us"] > 0, name
        assert 0 < row["ratio"] < 2, (name, row["ratio"])
    assert results["problems"] == []


def test_each_option_is_costed_against_its_own_reference(quick_run):
    _, stdout, results = quick_run
    rows = {r["variant"]: r for r in results["options"]}
    assert set(rows) == {v for v in VARIANTS if v.startswith("opt_")} | {
        "hit_shipped",
        "hit_trusted",
    }
    assert rows["opt_room"]["ref"] == "room_off" and rows["opt_sync_kind"]["ref"] == "hit"
    for name, row in rows.items():
        assert 0 < row["ratio"] < 3, (name, row)
    assert "Options (each against" in stdout


def test_latency_burst_and_memory_are_reported(quick_run):
    _, _, results = quick_run
    lat = results["latency"]
    for design in ("msr", "minimal", "lua"):
        for kind in ("miss", "hit"):
            p = lat[design][kind]
            assert p["n"] > 0 and 0 < p["p50"] <= p["p99"], (design, kind, p)
    assert lat["none"]["hit"]["n"] > 0 and lat["whoami direct"]["miss"]["n"] > 0
    for design in ("msr", "minimal", "lua"):
        b = results["burst"][design]
        # Every token's first requests reached whoami at least once (none was answered from a
        # cache it could not have had), and never more often than there were requests.
        assert b["tokens"] > 0 and all(1 <= c <= 20 for c in b["calls"]), (design, b)
        assert sum(b["connections_per_worker"]) >= 20 * b["tokens"]
    capacities = [m["capacity"] for m in results["memory"]]
    assert capacities == [4096, None]
    for m in results["memory"]:
        assert m["tokens"] >= 20_000 and m["whoami_calls"] >= 0.99 * m["tokens"], m
        assert 0 < m["rss_before"] <= m["rss_peak"], m


def test_profile_splits_every_profiled_variant(quick_run):
    """The perf phase: every profiled variant's CPU split into regions, in the report too. A
    no-op's guest code takes a smaller share than the filter's (it returns at once)."""
    if not shutil.which("perf"):
        pytest.skip("perf not installed (`just bench-tools` installs Debian's linux-perf)")
    out, stdout, results = quick_run
    profile = results["profile"]
    refused = [line for line in stdout.splitlines() if line.startswith("profile: perf gave no")]
    if not profile and refused:
        pytest.skip(f"perf cannot sample Envoy on this machine: {refused[0]}")
    assert list(profile) == ["none", "noop", "sdk_noop", "minimal", "lua", "hit", "hit_trusted"]
    for name, row in profile.items():
        total = sum(row[r] for r in ("envoy", "jit", "kernel", "libc/other"))
        assert 0 < total < 10_000 and 0 <= row["jit_share"] < 1, (name, row)
    assert profile["none"]["jit"] == 0 or profile["none"]["jit_share"] < 0.01
    assert profile["noop"]["jit_share"] < profile["hit"]["jit_share"]
    assert "## Where the time goes" in (out / "BENCHMARKS.md").read_text()


def test_report_and_plot_are_written(quick_run):
    out, stdout, _ = quick_run
    text = (out / "BENCHMARKS.md").read_text()
    for section in (
        "## Method",
        "## Cost",
        "## Targets",
        "## Latency",
        "## Burst",
        "## Memory",
        "## Every round",
    ):
        assert section in text
    for name in VARIANTS:
        assert f"| {name} |" in text and f"| {name} |" in stdout
    root = ET.parse(out / "plot.svg").getroot()
    assert root.tag.endswith("svg") and len(root) > 20
    assert "\nold\n" not in text and SYNAPSE_KEPT in text and REGRESSION_KEPT in text


def test_regression_run_writes_its_section_and_keeps_the_others(tmp_path):
    """`just bench-regression`'s run (here this build against itself, --quick): every round's
    four variants and both ratios printed, its section written, the other sections kept."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(f"# Benchmarks\n\n## Method\n\nmain\n\n{SYNAPSE_KEPT}\n")
    argv = ["--quick", "--wasm", str(WASM), "--baseline-wasm", str(WASM), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "msrbench.regression", "--baseline-rev", "HEAD", *argv],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    # 1: a regression judged (possible: one round of noise between identical modules).
    assert proc.returncode in (0, 1), f"failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert "CHECKS FAILED" not in proc.stdout, proc.stdout
    for name in ("none", "hit", "hit_base", "hit_again", "baseline ÷ current", "A/A"):
        assert f"| {name} " in proc.stdout, name
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n## Method\n\nmain\n") and SYNAPSE_KEPT in text
    section = text.partition(regression.BEGIN)[2].partition(regression.END)[0]
    assert "## Hit path against an earlier build" in section and "**Judgement:**" in section
