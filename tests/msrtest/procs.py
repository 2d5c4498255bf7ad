"""Process supervision, the one supervisor for tests, demo and bench: every child runs in its own
session, is sent SIGTERM by the kernel when its parent dies (PR_SET_PDEATHSIG), and is stopped with
its whole process group; signals that arrive while a child is started or stopped are held until
that is done, so no exit path leaves a process behind."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from msrtest.env import E2E_DIR


class StackError(RuntimeError):
    pass


def venv_bin(name: str) -> str:
    """A console script of the interpreter's own environment (the pinned .venv), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found next to {sys.executable} nor on PATH (run `just venv`)")
    return found


def just_executable() -> str | None:
    """The `just` running this session (`just e2e` passes it as $MSR_JUST), else one on PATH."""
    return os.environ.get("MSR_JUST") or shutil.which("just")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1, check=None):
    """Poll predicate() until it returns a truthy value; check() may raise to abort early."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# process lifecycle: no exit path (Ctrl-C once or many times, SIGTERM, SIGHUP, an exception, the
# parent being killed) leaves a process, a port or a work directory behind

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Runs in the child between fork and exec: the kernel sends it SIGTERM when the parent dies,
    even by SIGKILL (PR_SET_PDEATHSIG survives exec). SIGTERM rather than SIGKILL so that a
    child with children of its own (an nginx master) stops them. If the parent is already gone,
    the child exits at once."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def signals_deferred():
    """Holds SIGINT, SIGTERM and SIGHUP while the block runs, then delivers them.

    Why: a signal landing inside a start (after the fork, before the child is recorded) or a
    shutdown (inside `proc.wait()`) abandons a child: a second Ctrl-C used to leave Synapse
    running. Signals reach only the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_on_termination() -> None:
    """SIGTERM and SIGHUP (where nobody handles them yet) raise KeyboardInterrupt like Ctrl-C, so
    pytest, the demo and any script using a Stack clean up on them too, instead of dying on the
    spot (their children would then be stopped only by the parent-death signal, and the work
    directory left behind)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_interrupt)


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live owner from a reused PID), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose working directory is `folder` or below it (the
    stack starts each child in its run's folder)."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").readlink()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            found.append((int(entry.name), cmdline.strip()))
    return found


def remove_stale_runs(e2e_dir: Path = E2E_DIR) -> list[Path]:
    """Removes the run folders under .e2e whose owner process is gone (it was killed, so it
    could not clean up), after killing anything still running in them. Folders kept on purpose
    (failed runs, $MSR_E2E_KEEP) have no owner file and stay."""
    removed = []
    for owner in e2e_dir.glob("*/owner"):
        try:
            pid, started = owner.read_text().split()
        except (OSError, ValueError):
            continue
        if start_time(int(pid)) == started:
            continue  # still running
        for stray, _ in processes_under(owner.parent):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)
        shutil.rmtree(owner.parent, ignore_errors=True)
        removed.append(owner.parent)
    return removed


def spawn(
    argv: list[str],
    *,
    stdout: int | IO[bytes] | None,
    cwd: Path | None = None,
    env: dict | None = None,
) -> subprocess.Popen:
    """Starts a supervised child: in its own session (a terminal's Ctrl-C reaches only its
    parent, which stops it in order), sent SIGTERM by the kernel if the parent dies first, stdin
    closed, stderr joined to `stdout`. Signals are held while it starts, so the caller records it
    before any Ctrl-C is handled."""
    parent = os.getpid()
    with signals_deferred():
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _die_with(parent),
        )


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `timeout` s, then SIGKILL to anything
    the leader left in its group; signals are held until it is done. Safe to call again."""
    with signals_deferred():
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout)
        _signal_group(proc, signal.SIGKILL)


class Process:
    """A supervised child (`spawn`) writing to `log`, killed with its whole group on stop().
    stop() may be called any number of times."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, env: dict | None = None):
        self.name = name
        self.log = log
        self._log_file = log.open("ab")
        self.proc = spawn(argv, stdout=self._log_file, cwd=cwd, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise StackError(f"{self.name} exited with {code}; last log lines:\n{tail(self.log)}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after `timeout` s; signals are held until it is done."""
        with signals_deferred():
            stop_group(self.proc, timeout)
            self._log_file.close()


class Children:
    """Every child of one run (the bench's Envoys, wrk, perf), started with `spawn`, optionally
    pinned to a core (taskset) and given a niceness that also applies to its session's autogroup
    (the kernel schedules sessions as groups, so a plain `nice` would not outweigh a build running
    in another session); `stop_all` ends them (and only them)."""

    def __init__(self, priority: int) -> None:
        self.procs: list[subprocess.Popen] = []
        self.priority = priority if os.geteuid() == 0 else 0

    def start(
        self,
        argv: list[str],
        cpu: int | str | None,
        log: Path | None = None,
        capture: bool = False,
    ) -> subprocess.Popen:
        """Starts argv pinned to `cpu` (a core, a taskset list such as "0,1", or None)."""
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        if self.priority:
            prefix += ["nice", "-n", str(self.priority)]
        if log:
            with log.open("wb") as out:
                proc = spawn([*prefix, *argv], stdout=out)
        else:
            proc = spawn(
                [*prefix, *argv], stdout=subprocess.PIPE if capture else subprocess.DEVNULL
            )
        self.procs.append(proc)
        if self.priority:
            # Without autogroup support the plain niceness still applies.
            with contextlib.suppress(OSError):
                Path(f"/proc/{proc.pid}/autogroup").write_text(str(self.priority))
        return proc

    def run(self, argv: list[str], cpu: int | None, timeout: float) -> tuple[int, str]:
        """Runs to completion (killed after `timeout` s); returns exit status and output."""
        proc = self.start(argv, cpu, capture=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            out, _ = proc.communicate()
        self.procs.remove(proc)
        return proc.returncode, out.decode(errors="replace")

    def stop(self, proc: subprocess.Popen) -> None:
        stop_group(proc, timeout=5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stops every child. The run is over: later SIGINT/SIGTERM/SIGHUP are ignored, so
        pressing Ctrl-C again cannot abandon a child in the middle of this."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for proc in list(self.procs):
            self.stop(proc)


class Service:
    """Something that runs as one child Process."""

    process: Process | None = None

    def spawn(self, name: str, argv: list[str], log: Path, cwd: Path) -> None:
        """Starts the child and records it in one step no signal can split."""
        with signals_deferred():
            self.process = Process(name, argv, log, cwd)

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.1):
        assert self.process is not None
        return wait_until(predicate, timeout, what, interval, check=self.process.check_alive)

    def stop(self) -> None:
        with signals_deferred():
            if self.process:
                self.process.stop()
                self.process = None


def process_rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise StackError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def running(service):
    """Starts `service` for the block and stops it after, whatever happens."""
    try:
        yield service.start()
    finally:
        service.stop()
