"""`just demo`: Synapse + Envoy + matrix-sync-router on 127.0.0.1, showing users pinned to workers.

Starts the same stack as the e2e tests (tests/e2e/stack.py, envoy.yaml from the repository root),
registers demo users with two devices each, syncs from every device and prints which sync worker
served each device. Then it stays up until Ctrl-C (or exits at once with --once).
"""

from __future__ import annotations

import argparse
import collections
import shlex
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stack  # noqa: E402

USERS = ["alice", "bob", "carol", "dave"]
DEVICES = 2
SYNCS_PER_DEVICE = 3


def run_demo(s: stack.Stack, envoy: stack.Envoy) -> list[stack.Device]:
    devices = [d for name in USERS for d in s.user_with_devices(envoy, name, DEVICES)]
    served: dict[str, collections.Counter] = {}
    for _ in range(SYNCS_PER_DEVICE):
        for device in devices:
            r = envoy.sync(device.token)
            if r.status != 200:
                raise stack.StackError(f"sync of {device.user_id} failed: {r.status} {r.body[:200]!r}")
            served.setdefault(device.device_id, collections.Counter())[envoy.worker_of(r)] += 1

    ports = {name: host for host, name in envoy.workers.items()}
    print()
    print(f"{'user':<22}  {'device':<12}  {'worker':<8}  {'listener':<16}  syncs")
    print(f"{'-' * 22}  {'-' * 12}  {'-' * 8}  {'-' * 16}  -----")
    for device in devices:
        for worker, n in sorted(served[device.device_id].items()):
            print(f"{device.user_id:<22}  {device.device_id:<12}  {worker:<8}  {ports[worker]:<16}  {n}")
    print()
    for name in USERS:
        mine = [d for d in devices if d.localpart == name]
        workers = {w for d in mine for w in served[d.device_id]}
        verdict = f"all on {workers.pop()}" if len(workers) == 1 else f"SPLIT over {sorted(workers)}"
        print(f"  {mine[0].user_id}: {len(mine)} devices, {verdict}")
    prom = envoy.prometheus()
    print(
        "\n  filter counters: "
        + ", ".join(
            f"{n}={int(prom.get(f'matrix_sync_router_{n}', 0))}"
            for n in ("requests", "cache_misses", "cache_hits", "whoami_ok")
        )
    )
    return devices


def print_instructions(s: stack.Stack, envoy: stack.Envoy, device: stack.Device) -> None:
    sync_url = f"{envoy.url}{stack.SYNC_PATH}?timeout=0"
    curl = f"curl -s -H {shlex.quote('Authorization: Bearer ' + device.token)} {shlex.quote(sync_url)}"
    print(
        f"""
Envoy (Matrix client API): {envoy.url}
Envoy admin:               {envoy.admin_url}   (stats: {envoy.admin_url}/stats/prometheus)
Synapse main process:      http://{stack.HOST}:{s.synapse.main_port}
Sync workers:              {', '.join(f'{n}={h}' for h, n in envoy.workers.items())}
Access log (JSON lines):   {envoy.access_log}
Logs and config:           {s.dir}

Try a sync as {device.user_id} (device {device.device_id}):
  {curl}
then see which worker served it:
  tail -n 1 {shlex.quote(str(envoy.access_log))}

Press Ctrl-C to stop (Synapse and Envoy are shut down and {s.dir.name} is removed)."""
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", type=Path, default=stack.DEFAULT_WASM, help="the built filter")
    parser.add_argument("--once", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)

    # SIGTERM/SIGHUP stop the demo like Ctrl-C does, so the processes are always cleaned up.
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    s = stack.Stack(args.wasm, n_workers=3, prefix="demo-")
    try:
        print(f"starting Synapse ({stack.SERVER_NAME}) with 3 sync-worker listeners ...", flush=True)
        s.start()
        print("starting Envoy with envoy.yaml and the filter ...", flush=True)
        envoy = s.add_envoy("demo")
        devices = run_demo(s, envoy)
        if args.once:
            return 0
        print_instructions(s, envoy, devices[0])
        sys.stdout.flush()
        threading.Event().wait()  # until Ctrl-C
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
