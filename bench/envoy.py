"""One bench Envoy: a generated configuration (configs.py), pinned to a core and started by the
run's `msrtest.procs.Children` (the one process supervisor), with admin-interface helpers (counters,
CPU time, resident memory)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from msrbench import BenchError
from msrtest.env import HOST
from msrtest.procs import Children


class Envoy:
    """One Envoy process running `cfg` (a dict), with admin-interface helpers."""

    def __init__(
        self,
        children: Children,
        binary: Path,
        workdir: Path,
        name: str,
        cfg: dict,
        cpu: int | str | None,
        concurrency: int = 1,
    ) -> None:
        self.name = name
        self.children = children
        self.cfg = cfg
        self.admin = cfg["admin"]["address"]["socket_address"]["port_value"]
        self.port = cfg["static_resources"]["listeners"][0]["address"]["socket_address"][
            "port_value"
        ]
        self.log = workdir / f"{name}.log"
        config_path = workdir / f"{name}.json"
        config_path.write_text(json.dumps(cfg, indent=1))
        self.proc = children.start(
            [
                str(binary),
                "-c",
                str(config_path),
                "--concurrency",
                str(concurrency),
                # No hot-restart shared memory: cannot collide with any other Envoy on the
                # machine (the e2e tests', a demo's, the other variants').
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ],
            cpu,
            log=self.log,
        )

    def get(self, path: str, timeout: float = 5) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.admin}{path}", timeout=timeout) as r:
            return r.read().decode()

    def wait_ready(self, timeout: float = 60) -> Envoy:
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
            # a thread that ended meanwhile counts nothing
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
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
