"""Every number in the configuration has an upper bound, and `check-config` (what `just validate`
runs) refuses a value one over it with a last line naming the field and the bound. The bounds
come from the Kong schema (meta.json), which the harness holds to the filter's own."""

from __future__ import annotations

import json

import pytest

from msrtest import proxyconf
from msrtest.env import WASM

NUMBERS = {
    field: spec
    for field, spec in proxyconf.config_schema()["properties"].items()
    if spec["type"] == "integer"
}


def test_every_number_has_a_bound_far_below_the_type_limit():
    assert set(NUMBERS) >= {"cache_ttl_s", "negative_ttl_s", "failure_backoff_s"}
    for field, spec in NUMBERS.items():
        assert spec["maximum"] < 2**32 - 1, field
    assert NUMBERS["cache_ttl_s"]["maximum"] == 7 * 24 * 3600
    assert NUMBERS["negative_ttl_s"]["maximum"] == 7 * 24 * 3600
    assert NUMBERS["failure_backoff_s"]["maximum"] == 3600


@pytest.mark.parametrize("field", sorted(NUMBERS))
def test_check_config_refuses_one_over_the_bound_naming_the_field(field):
    maximum = NUMBERS[field]["maximum"]
    for value, accepted in ((maximum, True), (maximum + 1, False), (2**32 - 1, False)):
        checked = proxyconf.filter_configure(WASM, json.dumps({field: value}), host="envoy")
        assert checked.accepted == accepted, (field, value, checked.output)
        if not accepted:
            last = checked.output[-1]
            assert f"field `{field}`" in last and str(maximum) in last, checked.output
