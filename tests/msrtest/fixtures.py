"""The e2e fixtures, a pytest plugin (tests/e2e/conftest.py loads it): one Synapse for the whole
session, Envoys in front of it (all real processes).

The filter under test is $MSR_WASM, else target/wasm32-wasip1/release/matrix_sync_router.wasm;
a missing file fails every test (run `just e2e`, which builds it first).
"""

from __future__ import annotations

import dataclasses

import pytest

from msrtest.env import WASM
from msrtest.matrix import Device
from msrtest.spread import DEVICES_PER_USER, samples_for_spread
from msrtest.stack import Stack


@dataclasses.dataclass
class User:
    user_id: str
    password: str = dataclasses.field(repr=False)
    devices: list[Device]
    worker: str = ""  # where its syncs landed (set by the `placed_users` fixture)


@pytest.fixture(scope="session")
def e2e_stack(request):
    if not WASM.is_file():
        pytest.fail(f"the filter is not built: {WASM} is missing (run `just build` / `just e2e`)")
    s = Stack(WASM, n_workers=3).start()
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
    for _round in range(3):
        for user in users:
            for device in user.devices:
                r = envoy.sync(device.token)
                assert r.status == 200, (user.user_id, r.status, r.body[:200])
                seen.setdefault(device.device_id, []).append(envoy.worker_of(r))
    for user in users:
        workers = {w for d in user.devices for w in seen[d.device_id]}
        user.worker = workers.pop() if len(workers) == 1 else f"several: {sorted(workers)}"
    return users, seen
