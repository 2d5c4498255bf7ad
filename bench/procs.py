"""Child processes of `just bench`: every one tracked and killed, and the Envoy wrapper.

Each child gets its own session (Ctrl-C reaches only bench/run.py, which then cleans up), dies
with the bench (PR_SET_PDEATHSIG), and can be pinned to a core (taskset) and given a niceness
that also applies to its session's autogroup (the kernel schedules sessions as groups, so a plain
`nice` would not outweigh a build running in another session).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    pass


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Children:
    """Every process the bench starts; `stop_all` ends them (and only them)."""

    def __init__(self, priority: int) -> None:
        self.procs: list[subprocess.Popen] = []
        self.priority = priority if os.geteuid() == 0 else 0

    def start(self, argv: list[str], cpu: int | str | None, log: Path | None = None,
              capture: bool = False) -> subprocess.Popen:
        """Starts argv pinned to `cpu` (a core, a taskset list such as "0,1", or None)."""
        prefix = ["taskset", "-c", str(cpu)] if cpu is not None else []
        if self.priority:
            prefix += ["nice", "-n", str(self.priority)]
        out = open(log, "wb") if log else (subprocess.PIPE if capture else subprocess.DEVNULL)
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
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

    def run(self, argv: list[str], cpu: int | None, timeout: float) -> tuple[int, str]:
        """Runs to completion (killed after `timeout` s); returns exit status and output."""
        proc = self.start(argv, cpu, capture=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        self.procs.remove(proc)
        return proc.returncode, out.decode(errors="replace")

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        """Stops every child. The run is over: later SIGINT/SIGTERM/SIGHUP are ignored, so
        pressing Ctrl-C again cannot abandon a child in the middle of this."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for proc in list(self.procs):
            self.stop(proc)


class Envoy:
    """One Envoy process running `cfg` (a dict), with admin-interface helpers."""

    def __init__(self, children: Children, binary: Path, workdir: Path, name: str, cfg: dict,
                 cpu: int | str | None, concurrency: int = 1) -> None:
        self.name = name
        self.children = children
        self.cfg = cfg
        self.admin = cfg["admin"]["address"]["socket_address"]["port_value"]
        self.port = cfg["static_resources"]["listeners"][0]["address"]["socket_address"][
            "port_value"]
        self.log = workdir / f"{name}.log"
        config_path = workdir / f"{name}.json"
        config_path.write_text(json.dumps(cfg, indent=1))
        self.proc = children.start(
            [
                str(binary), "-c", str(config_path),
                "--concurrency", str(concurrency),
                # No hot-restart shared memory: cannot collide with any other Envoy on the
                # machine (the e2e tests', a demo's, the other variants').
                "--disable-hot-restart",
                "--log-level", "warn",
            ],
            cpu,
            log=self.log,
        )

    def get(self, path: str, timeout: float = 5) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}{path}", timeout=timeout) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float = 60) -> "Envoy":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"envoy {self.name} exited:\n{self.log_tail()}")
            try:
                if self.get("/ready", timeout=1).strip() == "LIVE":
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise BenchError(f"envoy {self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        self.children.stop(self.proc)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stats(self, pattern: str) -> dict[str, int]:
        """Counters and gauges whose name matches the regex `pattern` (the `wasmcustom.`
        namespace Envoy 1.40's text /stats keeps for wasm metrics is stripped)."""
        text = self.get("/stats?filter=" + urllib.request.quote(pattern))
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name.removeprefix("wasmcustom.")] = int(value)
        return out

    def stat(self, name: str) -> int:
        return self.stats(f"^{re.escape(name)}$").get(name, 0)

    def cpu_ns(self) -> int:
        """CPU time of every thread of the process, in ns (schedstat: time on CPU)."""
        total = 0
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
        return total

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no VmRSS for envoy {self.name}")


def envoy_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"version: ([0-9a-f]+)/(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return f"{m.group(2)} (build {m.group(1)[:12]})" if m else "unknown"


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "unknown"
