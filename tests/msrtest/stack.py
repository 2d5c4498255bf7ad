"""Real Synapse + real Envoy (with the real filter) on 127.0.0.1, for the e2e tests and the demo.

A Stack is one Synapse (msrtest.synapse: SQLite, extra `client` listeners playing the sync workers)
and any number of Envoys in front of it (msrtest.envoy: the repository's own envoy.yaml), all in
one work folder under .e2e/ that no exit path leaves behind (msrtest.procs).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from msrtest.env import DEFAULT_WASM, E2E_DIR
from msrtest.envoy import Envoy
from msrtest.matrix import Device
from msrtest.procs import (
    StackError,
    remove_stale_runs,
    signals_deferred,
    start_time,
    stop_on_termination,
)
from msrtest.synapse import Synapse

# --------------------------------------------------------------------------------------------
# the whole stack


class Stack:
    """Synapse plus any number of Envoys in one work directory under .e2e/.

    The folder holds an `owner` file (PID and start time of this process) until close(): a run
    whose owner was killed is removed by the next Stack (`remove_stale_runs`). close() stops
    everything even when signals keep arriving, may be called more than once, and runs at
    interpreter exit if nobody called it."""

    def __init__(self, wasm: Path = DEFAULT_WASM, n_workers: int = 3, prefix: str = "stack-"):
        self.wasm = Path(wasm).resolve()
        if not self.wasm.is_file():
            raise StackError(f"filter not built: {self.wasm} is missing (run `just build`)")
        stop_on_termination()
        E2E_DIR.mkdir(exist_ok=True)
        remove_stale_runs()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=E2E_DIR))
        (self.dir / "owner").write_text(f"{os.getpid()} {start_time(os.getpid())}\n")
        self.synapse = Synapse(self.dir / "synapse", n_workers)
        self.envoys: list[Envoy] = []
        self.closed = False
        # If the owner's own cleanup was cut short (pytest's teardown skipped by a second
        # Ctrl-C), the interpreter's exit still stops everything.
        atexit.register(self.close)

    def start(self) -> Stack:
        try:
            self.synapse.start()
        except BaseException:
            self.close(keep_dir=False)
            raise
        return self

    def add_envoy(self, name: str, **kwargs) -> Envoy:
        envoy = Envoy(self.dir, name, self.synapse, self.wasm, **kwargs)
        self.envoys.append(envoy)
        envoy.start()
        return envoy

    def prepare_envoy(self, name: str, cls: type[Envoy] | None = None, **kwargs) -> Envoy:
        """An Envoy (of class `cls`) that the test may still change (its `cfg`, its worker
        ports) before calling start(); it is stopped with the stack."""
        envoy = (cls or Envoy)(self.dir, name, self.synapse, self.wasm, **kwargs)
        self.envoys.append(envoy)
        return envoy

    def user_with_devices(self, envoy: Envoy, localpart: str, n_devices: int) -> list[Device]:
        """Register `localpart` and log in `n_devices` devices through `envoy`."""
        first = self.synapse.register(localpart)
        password = self.synapse.passwords[first.user_id]
        return [
            envoy.login(first.user_id, password, f"{localpart}-dev{i + 1}")
            for i in range(n_devices)
        ]

    def pids(self) -> list[int]:
        """The PIDs of the running children (Synapse, Envoys)."""
        services = [self.synapse, *self.envoys]
        return [s.process.pid for s in services if s.process]

    def ports(self) -> list[int]:
        """Every port the stack's children listen on."""
        ports = [self.synapse.main_port, *self.synapse.worker_ports]
        for envoy in self.envoys:
            ports += [envoy.port, envoy.admin_port]
        return ports

    def close(self, keep_dir: bool = False) -> None:
        """Stop every process; remove the work directory unless keep_dir (or $MSR_E2E_KEEP).
        Signals arriving meanwhile are delivered once everything is stopped."""
        with signals_deferred():
            if self.closed:
                return
            for envoy in reversed(self.envoys):
                envoy.stop()
            self.synapse.stop()
            if keep_dir or os.environ.get("MSR_E2E_KEEP"):
                (self.dir / "owner").unlink(missing_ok=True)  # kept on purpose: not stale
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.closed = True

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        # Keep the logs of a failure; an interrupt (Ctrl-C, SIGTERM) is no failure.
        self.close(keep_dir=exc_type is not None and issubclass(exc_type, Exception))
