"""envoy.yaml as shipped: Envoy accepts it, and it agrees with the filter's contract (docs/)."""

from __future__ import annotations

import json
import re
import subprocess

import yaml

from msrtest.env import ENVOY_YAML, REPO, WASM
from msrtest.procs import venv_bin


def _shipped() -> dict:
    return yaml.safe_load(ENVOY_YAML.read_text())


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
        [venv_bin("envoy"), "--mode", "validate", "-c", str(path), "--log-level", "warn"],
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
    sync_clusters = ("synapse_sync_workers", "synapse_initial_sync")
    sync_routes = [r for r in routes if r.get("route", {}).get("cluster") in sync_clusters]
    header = conf.get("header_name", "x-user-identifier")
    for route in sync_routes:
        assert route["route"]["hash_policy"] == [{"header": {"header_name": header}}]
        assert route["route"]["timeout"] == "0s", "long-poll syncs need no overall deadline"
    assert clusters["synapse_sync_workers"]["lb_policy"] in ("RING_HASH", "MAGLEV")
    # The initial-sync route matches the header the filter sets, and its pool falls back to the
    # sync workers.
    (initial,) = [r for r in sync_routes if r["route"]["cluster"] == "synapse_initial_sync"]
    assert initial["match"]["headers"][0]["name"] == conf["sync_kind_header"]
    aggregate = clusters["synapse_initial_sync"]["cluster_type"]["typed_config"]["clusters"]
    assert aggregate == ["synapse_initial_sync_workers", "synapse_sync_workers"]
    (rooms,) = [r for r in routes if r.get("route", {}).get("cluster") == "synapse_room_workers"]
    assert rooms["route"]["hash_policy"] == [{"header": {"header_name": conf["room_header_name"]}}]
    assert "typed_per_filter_config" not in rooms, "the filter must run on the room route"

    # The routes' regexes and the filter's path templates (docs/configuration.md's defaults, which
    # tests/harness/tests/docs.rs holds to the filter, unless the plugin configuration sets its
    # own) accept exactly the same paths.
    readme = (REPO / "docs" / "configuration.md").read_text()
    templates = conf.get("sync_paths") or _readme_block(readme, "sync_paths")
    regexes = [r["match"]["safe_regex"]["regex"] for r in sync_routes]
    room_templates = conf.get("room_paths") or _readme_block(readme, "room_paths")
    for path in SAMPLE_PATHS:
        assert _any_template(templates, path) == any(re.match(x, path) for x in regexes), path
        assert _any_template(room_templates, path) == bool(
            re.match(rooms["match"]["safe_regex"]["regex"], path)
        ), path


SAMPLE_PATHS = [
    "/_matrix/client/v3/sync",
    "/_matrix/client/r0/sync",
    "/_matrix/client/api/v1/events",
    "/_matrix/client/unstable/initialSync",
    "/_matrix/client/v3/rooms/!a:x/initialSync",
    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    "/_matrix/client/v3/sync/x",
    "/_matrix/client/v4/sync",
    "/_matrix/client/v4/sync/",
    "/x/_matrix/client/v3/sync",
    "/_matrix/client/v3/rooms/a/b/initialSync",
    "/_matrix/client/v3/account/whoami",
    "/_matrix/client/v3/rooms/!a:x/messages",
    "/_matrix/client/r0/rooms/!a:x/send/m.room.message/txn1",
    "/_matrix/client/v3/rooms/!a:x/join",
    "/_matrix/client/v1/rooms/!a:x/relations/$e",
    "/_matrix/client/v1/rooms/!a:x/hierarchy",
    "/_matrix/client/v3/rooms/!a:x/state/m.room.name/",
    "/_matrix/client/v3/rooms//messages",
    "/_matrix/client/v3/rooms/!a:x/messagesX",
    "/_matrix/client/v3/rooms/!a:x/context/$ev",
]


def _readme_block(readme: str, field: str) -> list[str]:
    block = re.search(rf"Default `{field}`:\s*```\s*\n(.*?)```", readme, re.S)
    assert block, f"docs/configuration.md lost its default {field} block"
    return block.group(1).split()


def _template_regex(template: str) -> str:
    """The filter's path-template language (docs/configuration.md) as a regex: `{a|b}`
    alternatives, `*` one segment, a final `**` anything after (or nothing)."""
    out = ""
    for part in re.split(r"(\{[^}]*\}|\*\*|\*)", template):
        if part.startswith("{"):
            out += "(" + "|".join(re.escape(a) for a in part[1:-1].split("|")) + ")"
        elif part == "**":
            out = out[:-1] + "(/.*)?"  # the `/` before `**` belongs to it
        elif part == "*":
            out += "[^/]+"
        else:
            out += re.escape(part)
    return f"^{out}$"


def _any_template(templates: list[str], path: str) -> bool:
    return any(re.match(_template_regex(t), path) for t in templates)
