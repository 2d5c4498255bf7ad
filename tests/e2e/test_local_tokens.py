"""Tokens read without a callout, in the real Envoy with tokens the real Synapse issued:
native `syt_` tokens name their user (`native_token_server_name`), and MAS-shaped tokens with a
broken checksum are refused a callout (`refuse_bad_mas_tokens`)."""

from __future__ import annotations

import re

import pytest

from msrtest.matrix import SERVER_NAME

WHOAMI_CALLS = "cluster.synapse_whoami.upstream_rq_total"
FALLBACK_KEY = re.compile(r"^~[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def local_envoy(e2e_stack):
    envoy = e2e_stack.add_envoy(
        "local",
        plugin_overrides={
            "native_token_server_name": SERVER_NAME,
            "refuse_bad_mas_tokens": True,
        },
    )
    yield envoy
    envoy.stop()


def test_native_tokens_are_routed_by_their_user_without_whoami(local_envoy, envoy, make_user):
    users = [make_user("native", n_devices=2) for _ in range(4)]
    before = local_envoy.stats()[WHOAMI_CALLS]
    for user in users:
        for device in user.devices:
            assert device.token.startswith("syt_"), "Synapse issues native tokens here"
            r = local_envoy.sync(device.token)
            assert r.status == 200
            entry = local_envoy.log_entry(r.request_id)
            assert (entry["user"], entry["key_source"]) == (user.user_id, "local"), entry
            # The same worker the whoami-resolving Envoy picks for this user: same key, same ring.
            assert local_envoy.worker_of(r) == envoy.worker_of(envoy.sync(device.token))
    assert local_envoy.stats()[WHOAMI_CALLS] == before, "no whoami call for native tokens"


def test_a_native_token_with_a_broken_checksum_is_never_trusted(local_envoy, make_user):
    token = make_user("junk", n_devices=1).devices[0].token
    junk = token[:-1] + ("A" if token[-1] != "A" else "B")
    before = local_envoy.stats()[WHOAMI_CALLS]
    r = local_envoy.sync(junk)
    assert r.status == 401  # the worker still authenticates
    assert FALLBACK_KEY.match(local_envoy.log_entry(r.request_id)["user"])
    assert local_envoy.stats()[WHOAMI_CALLS] == before


def test_mas_shaped_tokens_with_a_broken_checksum_make_no_callout(local_envoy):
    before = local_envoy.stats()[WHOAMI_CALLS]
    bad = local_envoy.sync("mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yX")
    assert FALLBACK_KEY.match(local_envoy.log_entry(bad.request_id)["user"])
    assert local_envoy.stats()[WHOAMI_CALLS] == before
    # A well-formed one (mas-data-model's own example) is asked about: Synapse rejects it.
    good = local_envoy.sync("mat_kkLSacJDpek22jKWw4AcXG68b7U3W6_0Lg9yb")
    assert good.status == 401
    assert local_envoy.stats()[WHOAMI_CALLS] == before + 1
