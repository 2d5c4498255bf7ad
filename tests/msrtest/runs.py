"""A command run as a user would run it (at a terminal, where Ctrl-C is typed, or piped), and
what it left behind read from /proc (processes below it, their listening ports): the harness of
test_lifecycle.py."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pty
import re
import signal
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from msrtest.env import HOST, REPO
from msrtest.procs import StackError, wait_until

UP_TIMEOUT = 120  # start-up of Synapse + Envoy on a loaded 2-core machine, with a wide margin
GONE_TIMEOUT = 30  # the run stops everything within ~10 s (SIGTERM, then SIGKILL after 10 s)


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
                target = str(fd.readlink())
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
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclasses.dataclass
class Snapshot:
    procs: list[Proc]
    ports: set[int]

    @classmethod
    def of(cls, root: int, expect: list[str]) -> Snapshot:
        """The processes below `root` once every name in `expect` is among their command lines
        (so the check afterwards cannot pass vacuously), and their listening ports."""

        def complete():
            procs = descendants(root)
            return procs if all(any(e in p.cmdline for p in procs) for e in expect) else None

        procs = wait_until(complete, UP_TIMEOUT, f"processes {expect} below {root}")
        return cls(procs, listening_ports(procs))

    def assert_all_gone(self) -> None:
        def gone():
            return not [p for p in self.procs if alive(p)] and all(map(port_free, self.ports))

        try:
            wait_until(gone, GONE_TIMEOUT, "every process gone and every port free", 0.2)
        except StackError:
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

    def __init__(
        self, argv: list[str], *, terminal: bool = False, cwd: Path = REPO, env: dict | None = None
    ):
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
                argv,
                cwd=cwd,
                env=env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
            os.close(slave)
            reader = self._read_pty
        else:
            self.master = None
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            reader = self._read_pipe
        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()

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
        """The exit status, once the output has been read to its end too (the reader thread
        can lag behind the exit: the last lines a run printed would be missing from `output`)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s; output:\n{self.output[-4000:]}")
        self._reader.join(5)  # EOF comes when no process holds the pipe or terminal any more
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
