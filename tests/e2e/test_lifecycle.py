"""No exit path of the demo, the e2e stack or the bench leaves a process, a port or a folder behind.

Each test starts the real thing as a user would (`just demo` at a terminal, demo.py, a pytest run
over the e2e fixtures, bench/run.py), waits until it is up, records every process it started and
every port they listen on (from /proc, so nothing depends on what the run says about itself), ends
it one way (Ctrl-C once or many times, SIGTERM, SIGHUP, SIGKILL of the parent, a failing start)
and then asserts that each of those processes is gone, each port is free and its folder under
.e2e/ is removed. Two exceptions, by design: a demo whose start-up failed keeps its folder (with
the logs that say why) and says so; a run killed with SIGKILL cannot remove its own folder, so the
next run removes it (`stack.remove_stale_runs`), which is checked too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

import stack
from conftest import WASM

E2E = Path(__file__).resolve().parent
DEMO = E2E / "demo.py"
BENCH = stack.REPO / "bench" / "run.py"
UP_TIMEOUT = 120  # start-up of Synapse + Envoy on a loaded 2-core machine, with a wide margin
GONE_TIMEOUT = 30  # the run stops everything within ~10 s (SIGTERM, then SIGKILL after 10 s)
DEMO_READY = "demo running — press Ctrl-C to stop"


# --------------------------------------------------------------------------------------------
# what a run left behind, read from /proc


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    start: str  # kernel start time: a reused PID is not mistaken for the same process
    cmdline: str


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [1] ppid, ..., [19] start time


def descendants(root: int) -> list[Proc]:
    """Every living process below `root` (not root itself)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))):
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found.append(Proc(pid, stat[19], cmdline.strip()))
        todo += children.get(pid, [])
    return found


def alive(p: Proc) -> bool:
    stat = _stat(p.pid)
    return stat is not None and stat[0] != "Z" and stat[19] == p.start


def listening_ports(procs: list[Proc]) -> set[int]:
    """TCP ports in LISTEN state whose socket is open in one of `procs`."""
    inodes = set()
    for p in procs:
        try:
            for fd in Path(f"/proc/{p.pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((stack.HOST, port))
        except OSError:
            return False
    return True


@dataclasses.dataclass
class Snapshot:
    procs: list[Proc]
    ports: set[int]

    @classmethod
    def of(cls, root: int, expect: list[str]) -> "Snapshot":
        """The processes below `root` once every name in `expect` is among their command lines
        (so the check afterwards cannot pass vacuously), and their listening ports."""

        def complete():
            procs = descendants(root)
            return procs if all(any(e in p.cmdline for p in procs) for e in expect) else None

        procs = stack.wait_until(complete, UP_TIMEOUT, f"processes {expect} below {root}")
        return cls(procs, listening_ports(procs))

    def assert_all_gone(self) -> None:
        def gone():
            return not [p for p in self.procs if alive(p)] and all(map(port_free, self.ports))

        try:
            stack.wait_until(gone, GONE_TIMEOUT, "every process gone and every port free", 0.2)
        except stack.StackError:
            left = [p.cmdline for p in self.procs if alive(p)]
            busy = [port for port in self.ports if not port_free(port)]
            for p in self.procs:  # do not leak them into the rest of the session
                if alive(p):
                    os.kill(p.pid, signal.SIGKILL)
            pytest.fail(f"left behind: processes {left}, ports {busy}")


# --------------------------------------------------------------------------------------------
# a run and its output


class Run:
    """A child whose output (stdout and stderr merged, or a terminal) is collected by a thread."""

    def __init__(self, argv: list[str], *, terminal: bool = False, cwd: Path = stack.REPO,
                 env: dict | None = None):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        env = {**os.environ, **(env or {})}
        if terminal:
            # A new session whose controlling terminal is a pty: Ctrl-C is written to it as a
            # user types it, and the terminal driver signals the foreground process group.
            try:
                self.master, slave = pty.openpty()
            except OSError as exc:
                pytest.skip(f"no pseudo-terminal to run it at: {exc}")
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
            os.close(slave)
            reader = self._read_pty
        else:
            self.master = None
            self.proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            reader = self._read_pipe
        threading.Thread(target=reader, daemon=True).start()

    def _add(self, data: bytes) -> None:
        with self._cond:
            self.lines += data.decode(errors="replace").replace("\r", "").splitlines()
            self._cond.notify_all()

    def _read_pipe(self) -> None:
        for line in self.proc.stdout:
            self._add(line)

    def _read_pty(self) -> None:
        partial = b""
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not data:
                break
            *done, partial = (partial + data).split(b"\n")
            for line in done:
                self._add(line)
        if partial:
            self._add(partial)

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = UP_TIMEOUT) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._cond.release()
                    try:
                        self.kill()
                        pytest.fail(f"no line matching {pattern!r}; output:\n{self.output[-4000:]}")
                    finally:
                        self._cond.acquire()
                self._cond.wait(0.2)

    def ctrl_c(self, times: int = 1, interval: float = 0.0) -> None:
        """Types Ctrl-C at the terminal `times` times."""
        for i in range(times):
            os.write(self.master, b"\x03")
            if i + 1 < times:
                time.sleep(interval)

    def signal(self, sig: int, times: int = 1, interval: float = 0.0) -> None:
        for i in range(times):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            if i + 1 < times:
                time.sleep(interval)

    def wait(self, timeout: float = GONE_TIMEOUT + 30) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s; output:\n{self.output[-4000:]}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# the demo


def _demo_folder(run: Run) -> Path:
    return Path(run.wait_for_line(r"files in (\S+/demo-[^ ]+) \.\.\.")[1])


def start_demo(*extra: str, terminal: bool = False, just: str | None = None) -> tuple[Run, Path]:
    argv = [just, "demo"] if just else [sys.executable, str(DEMO), "--wasm", str(WASM)]
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
    found = stack.just_executable()
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
        assert re.search(r"stopped; demo-\S+ removed\n(\^C)*\S*error\S*: \S*interrupted", after), after
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
    assert folder in stack.remove_stale_runs()
    assert not folder.exists()


def test_demo_failing_start_stops_synapse_and_keeps_the_logs(tmp_path):
    """An exception (Envoy refuses a module that is not wasm) after Synapse is up: Synapse is
    stopped, exit status 1, the folder kept with the logs and named in the output."""
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not a wasm module")
    run = Run([sys.executable, str(DEMO), "--wasm", str(bad)])
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
# the e2e stack, as pytest runs it (the session fixtures of conftest.py)

HOLD_TEST = """
import time

def test_hold(envoy, e2e_stack):
    print("STACK UP", e2e_stack.dir, flush=True)
    time.sleep(600)
"""


def start_pytest_stack(tmp_path) -> tuple[Run, Path, Snapshot]:
    (tmp_path / "test_hold.py").write_text(HOLD_TEST)
    run = Run(
        [sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider", "-p", "conftest",
         str(tmp_path / "test_hold.py")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(E2E), "MSR_WASM": str(WASM.resolve())},
    )
    folder = Path(run.wait_for_line(r"STACK UP (\S+)")[1])
    snap = Snapshot.of(run.proc.pid, ["synapse.app.homeserver", "envoy"])
    return run, folder, snap


@pytest.mark.parametrize(
    "sig,times", [(signal.SIGINT, 1), (signal.SIGINT, 4), (signal.SIGTERM, 1)],
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
    assert folder in stack.remove_stale_runs()


# --------------------------------------------------------------------------------------------
# the bench


def test_bench_interrupted_leaves_nothing(tmp_path):
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed (`just bench` installs it)")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the bench needs two cores")
    run = Run([
        sys.executable, str(BENCH), "--wasm", str(WASM), "--rounds", "1", "--duration", "1",
        "--warmup", "30", "--phases", "cost", "--nice", "0", "--out", "-", "--plot", "-",
    ])
    run.wait_for_line(r"variants x 1 rounds")
    snap = Snapshot.of(run.proc.pid, ["envoy", "wrk"])  # during the warm-up
    folders = {m for p in snap.procs for m in re.findall(r"/tmp/msr-bench-[^/ ]+", p.cmdline)}
    assert folders, snap
    run.signal(signal.SIGINT, 3, interval=0.15)
    assert run.wait() == 130, run.output[-3000:]
    snap.assert_all_gone()
    assert not [f for f in folders if Path(f).exists()]
