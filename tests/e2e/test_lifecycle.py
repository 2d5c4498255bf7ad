"""No exit path of the demo, the e2e stack or the bench leaves a process, a port or a folder behind.

Each test starts the real thing as a user would (`just demo` at a terminal, demo.py, a pytest run
over the e2e fixtures, bench/run.py), waits until it is up, records every process it started and
every port they listen on (from /proc, so nothing depends on what the run says about itself), ends
it one way (Ctrl-C once or many times, SIGTERM, SIGHUP, SIGKILL of the parent, a failing start)
and then asserts that each of those processes is gone, each port is free and its folder under
.e2e/ is removed. Two exceptions, by design: a demo whose start-up failed keeps its folder (with
the logs that say why) and says so; a run killed with SIGKILL cannot remove its own folder, so the
next run removes it (`remove_stale_runs`), which is checked too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest

from msrtest.env import WASM
from msrtest.procs import just_executable, remove_stale_runs
from msrtest.runs import Run, Snapshot

DEMO = [sys.executable, "-m", "msrtest.demo"]
BENCH = [sys.executable, "-m", "msrbench.run"]
DEMO_READY = "demo running — press Ctrl-C to stop"


# --------------------------------------------------------------------------------------------
# the demo


def _demo_folder(run: Run) -> Path:
    return Path(run.wait_for_line(r"files in (\S+/demo-[^ ]+) \.\.\.")[1])


def start_demo(*extra: str, terminal: bool = False, just: str | None = None) -> tuple[Run, Path]:
    argv = [just, "demo"] if just else [*DEMO, "--wasm", str(WASM)]
    run = Run([*argv, *extra], terminal=terminal)
    return run, _demo_folder(run)


def assert_demo_stopped_cleanly(run: Run, code: int, snap: Snapshot, folder: Path) -> None:
    assert code == 0, run.output[-3000:]
    snap.assert_all_gone()
    assert "stopped; demo-" in run.output, run.output[-3000:]
    assert not folder.exists(), f"{folder} left behind"
    assert "Traceback" not in run.output, run.output[-3000:]


@pytest.fixture
def just_bin() -> str:
    found = just_executable()
    if not found:
        pytest.skip("`just` not found: run through `just e2e`, or put just on PATH")
    return found


@pytest.mark.parametrize("presses", [1, 5], ids=["ctrl-c-once", "ctrl-c-5-times"])
def test_just_demo_at_a_terminal_stops_on_ctrl_c(just_bin, presses):
    """`just demo` as a user runs it: it says it waits for Ctrl-C; one Ctrl-C or five in quick
    succession (landing in the shutdown) stop everything, exit 0, and just reports no error."""
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing")
    run, folder = start_demo(terminal=True, just=just_bin)
    run.wait_for_line(re.escape(DEMO_READY))
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver", "envoy"])
    assert len(snap.ports) >= 6, snap  # Synapse main + 3 workers, Envoy listener + admin
    run.ctrl_c(presses, interval=0.15)
    code = run.wait()
    after = run.output.split(DEMO_READY)[-1]
    if presses > 1 and code == 130:
        # A press typed after the demo had exited (and handed the terminal back) reaches just,
        # which then says so; the demo itself must have finished first.
        assert re.search(r"stopped; demo-\S+ removed\n(\^C)*\S*error\S*: \S*interrupted", after), (
            after
        )
        code = 0
    else:
        assert "error" not in after.lower(), run.output[-3000:]
    assert_demo_stopped_cleanly(run, code, snap, folder)


@pytest.mark.parametrize(
    "sig,times",
    [(signal.SIGINT, 3), (signal.SIGTERM, 1), (signal.SIGHUP, 1), (signal.SIGTERM, 4)],
    ids=["sigint-3-times", "sigterm", "sighup", "sigterm-4-times"],
)
def test_demo_stops_on_signals(sig, times):
    run, folder = start_demo()
    run.wait_for_line(re.escape(DEMO_READY))
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver", "envoy"])
    run.signal(sig, times, interval=0.1)
    assert_demo_stopped_cleanly(run, run.wait(), snap, folder)


def test_demo_interrupted_while_synapse_starts():
    run, folder = start_demo()
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver"])
    run.signal(signal.SIGINT, 2, interval=0.3)
    assert_demo_stopped_cleanly(run, run.wait(), snap, folder)


def test_demo_killed_takes_its_children_along():
    """SIGKILL of the demo: the kernel stops Synapse and Envoy (parent-death signal); the folder
    it could not remove is removed by the next run."""
    run, folder = start_demo()
    run.wait_for_line(re.escape(DEMO_READY))
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver", "envoy"])
    run.signal(signal.SIGKILL)
    run.wait()
    snap.assert_all_gone()
    assert (folder / "owner").is_file()
    assert folder in remove_stale_runs()
    assert not folder.exists()


def test_demo_failing_start_stops_synapse_and_keeps_the_logs(tmp_path):
    """An exception (Envoy refuses a module that is not wasm) after Synapse is up: Synapse is
    stopped, exit status 1, the folder kept with the logs and named in the output."""
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not a wasm module")
    run = Run([*DEMO, "--wasm", str(bad)])
    folder = _demo_folder(run)
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver"])
    code = run.wait()
    try:
        assert code == 1, run.output[-3000:]
        snap.assert_all_gone()
        assert "demo failed: envoy demo exited" in run.output, run.output[-3000:]
        assert f"logs kept in {folder}" in run.output
        assert (folder / "demo.envoy.log").is_file()
        assert not (folder / "owner").exists(), "a kept folder must not look stale"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the e2e stack, as pytest runs it (the session fixtures of msrtest.fixtures)

HOLD_TEST = """
import time

def test_hold(envoy, e2e_stack):
    print("STACK UP", e2e_stack.dir, flush=True)
    time.sleep(600)
"""


def start_pytest_stack(tmp_path) -> tuple[Run, Path, Snapshot]:
    (tmp_path / "test_hold.py").write_text(HOLD_TEST)
    run = Run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "msrtest.fixtures",
            str(tmp_path / "test_hold.py"),
        ],
        cwd=tmp_path,
        env={"MSR_WASM": str(WASM.resolve())},
    )
    folder = Path(run.wait_for_line(r"STACK UP (\S+)")[1])
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver", "envoy"])
    return run, folder, snap


@pytest.mark.parametrize(
    "sig,times",
    [(signal.SIGINT, 1), (signal.SIGINT, 4), (signal.SIGTERM, 1)],
    ids=["sigint", "sigint-4-times", "sigterm"],
)
def test_e2e_stack_stops_when_pytest_is_interrupted(tmp_path, sig, times):
    run, folder, snap = start_pytest_stack(tmp_path)
    run.signal(sig, times, interval=0.15)
    run.wait()
    snap.assert_all_gone()
    assert not folder.exists(), f"{folder} left behind\n{run.output[-3000:]}"


def test_e2e_stack_dies_with_a_killed_pytest(tmp_path):
    run, folder, snap = start_pytest_stack(tmp_path)
    run.signal(signal.SIGKILL)
    run.wait()
    snap.assert_all_gone()
    assert folder in remove_stale_runs()


# --------------------------------------------------------------------------------------------
# the bench


def test_bench_interrupted_leaves_nothing(tmp_path):
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (`just bench` installs it)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the bench needs two cores")
    run = Run(
        [
            *BENCH,
            "--wasm",
            str(WASM),
            "--rounds",
            "1",
            "--duration",
            "1",
            "--warmup",
            "30",
            "--phases",
            "cost",
            "--nice",
            "0",
            "--out",
            "-",
            "--plot",
            "-",
        ]
    )
    run.wait_for_line(r"variants x 1 rounds")
    snap = Snapshot.of(run.proc.pid, ["envoy", "wrk"])  # during the warm-up
    folders = {m for p in snap.procs for m in re.findall(r"/tmp/msr-bench-[^/ ]+", p.cmdline)}
    assert folders, snap
    run.signal(signal.SIGINT, 3, interval=0.15)
    assert run.wait() == 130, run.output[-3000:]
    snap.assert_all_gone()
    assert not [f for f in folders if Path(f).exists()]
