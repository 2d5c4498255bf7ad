"""envoy.yaml as shipped: Envoy accepts it, and it agrees with the filter's contract (README)."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

import stack
from conftest import WASM


def _shipped() -> dict:
    return yaml.safe_load(stack.ENVOY_YAML.read_text())


def _hcm(cfg: dict) -> dict:
    (listener,) = cfg["static_resources"]["listeners"]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _plugin(cfg: dict) -> dict:
    (wasm,) = [f for f in _hcm(cfg)["http_filters"] if f["name"] == "envoy.filters.http.wasm"]
    return wasm["typed_config"]["config"]


def test_envoy_validates_the_shipped_file(tmp_path):
    """Only the .wasm path is changed (the operator's host names stay)."""
    cfg = _shipped()
    _plugin(cfg)["vm_config"]["code"]["local"]["filename"] = str(WASM.resolve())
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [stack.venv_bin("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "OK" in output, output[-3000:]
    assert "Deprecated" not in output, output[-3000:]


def test_routes_and_plugin_config_match_the_filter_contract():
    cfg = _shipped()
    plugin = _plugin(cfg)
    assert plugin["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    assert plugin["vm_config"]["vm_id"], "a fixed vm_id shares the cache between threads"
    conf = json.loads(plugin["configuration"]["value"])
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert conf["whoami_upstream"] in clusters

    filters = [f["name"] for f in _hcm(cfg)["http_filters"]]
    assert filters.index("envoy.filters.http.wasm") < filters.index("envoy.filters.http.router")

    routes = _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    sync_routes = [r for r in routes if r.get("route", {}).get("cluster") == "synapse_sync_workers"]
    header = conf.get("header_name", "x-user-identifier")
    for route in sync_routes:
        assert route["route"]["hash_policy"] == [{"header": {"header_name": header}}]
        assert route["route"]["timeout"] == "0s", "long-poll syncs need no overall deadline"
    assert clusters["synapse_sync_workers"]["lb_policy"] in ("RING_HASH", "MAGLEV")

    # The sync route regexes are exactly the filter's sync_paths (README's defaults unless the
    # plugin configuration sets its own).
    readme = (stack.REPO / "README.md").read_text()
    block = re.search(r"Default `sync_paths`:\s*```\s*\n(.*?)```", readme, re.S)
    assert block, "README lost its default sync_paths block"
    expected = conf.get("sync_paths") or block.group(1).split()
    assert [r["match"]["safe_regex"]["regex"] for r in sync_routes] == expected
