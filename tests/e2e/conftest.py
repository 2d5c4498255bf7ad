"""Fixtures: one Synapse for the whole session, Envoys in front of it (all real processes).

The filter under test is $MSR_WASM, else target/wasm32-wasip1/release/matrix_sync_router.wasm;
a missing file fails every test (run `just e2e`, which builds it first).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest

import stack

WASM = Path(os.environ.get("MSR_WASM", stack.DEFAULT_WASM))

# Worst case share of the ring one worker owns. With `minimum_ring_size: 1024` and three workers
# each owns about 1/3 of the ring; 0.5 leaves a wide margin for uneven rings.
MAX_WORKER_SHARE = 0.5
# Accepted chance that a spreading assertion fails although Envoy spreads as it should.
FALSE_FAILURE = 1e-6
DEVICES_PER_USER = 3


def samples_for_spread(max_share: float = MAX_WORKER_SHARE, p_fail: float = FALSE_FAILURE) -> int:
    """How many independently placed keys make "all on one worker" less likely than p_fail.

    P(all n on one worker) = sum_i s_i^n <= max_share^(n-1) * sum_i s_i = max_share^(n-1).
    """
    return 1 + math.ceil(math.log(p_fail) / math.log(max_share))


@dataclasses.dataclass
class User:
    user_id: str
    password: str = dataclasses.field(repr=False)
    devices: list[stack.Device]
    worker: str = ""  # where its syncs landed (set by the `placed_users` fixture)


@pytest.fixture(scope="session")
def e2e_stack(request):
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing (run `just build` / `just e2e`)")
    s = stack.Stack(WASM, n_workers=3).start()
    yield s
    failed = request.session.testsfailed > 0
    s.close(keep_dir=failed)
    if failed:
        print(f"\ne2e logs kept in {s.dir}")


@pytest.fixture(scope="session")
def envoy(e2e_stack):
    """Envoy with envoy.yaml's plugin configuration as shipped."""
    return e2e_stack.add_envoy("default")


@pytest.fixture(scope="session")
def make_user(e2e_stack, envoy):
    counter = iter(range(10_000))

    def make(prefix: str = "user", n_devices: int = DEVICES_PER_USER) -> User:
        localpart = f"{prefix}{next(counter)}"
        devices = e2e_stack.user_with_devices(envoy, localpart, n_devices)
        user_id = devices[0].user_id
        return User(user_id, e2e_stack.synapse.passwords[user_id], devices)

    return make


@pytest.fixture(scope="session")
def placed_users(envoy, make_user):
    """Enough users (each with several devices) that ring hashing spreads them; each device
    synced several times through Envoy. Returns (users, {device_id: [worker, ...]})."""
    users = [make_user("placed") for _ in range(samples_for_spread())]
    seen: dict[str, list[str]] = {}
    for round_ in range(3):
        for user in users:
            for device in user.devices:
                r = envoy.sync(device.token)
                assert r.status == 200, (user.user_id, r.status, r.body[:200])
                seen.setdefault(device.device_id, []).append(envoy.worker_of(r))
    for user in users:
        workers = {w for d in user.devices for w in seen[d.device_id]}
        user.worker = workers.pop() if len(workers) == 1 else f"several: {sorted(workers)}"
    return users, seen
