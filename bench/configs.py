"""Envoy configurations of `just bench`: one base configuration, variants differ in the filter.

Every variant's Envoy is `base_config(...)` with one HTTP filter chain: the same listener options
as envoy.yaml (access log left out: it would cost the same in every variant), the same routes
(envoy.yaml's two sync regexes, then a catch-all), all answered by Envoy itself
(`direct_response`), and one `synapse_whoami` cluster. The wasm filters are envoy.yaml's own wasm
block with only the module (and, for the fixtures, the vm_id) replaced.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from msrbench import BenchError
from msrtest.env import HOST

SYNC_ROUTE_REGEXES = [  # envoy.yaml's sync routes (the filter's default sync_paths)
    r"^/_matrix/client/(api/v1|r0|v3|unstable)/(sync|events|initialSync|rooms/[^/]+/initialSync)$",
    r"^/_matrix/client/unstable/org\.matrix\.simplified_msc3575/sync$",
]
WHOAMI_CLUSTER = "synapse_whoami"  # the cluster the fixtures (minimal, route.lua) call
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
WASM_OFF = {
    "envoy.filters.http.wasm": {
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "disabled": True,
    }
}
# Echoes the hash key the filter set back to the client, so the latency and burst phases check
# that every answer carried the right user. Not in the CPU rounds: it would add the same cost to
# every variant and so flatten the ratios.
ECHO_USER = [{"header": {"key": "x-bench-user", "value": "%REQ(x-user-identifier)%"}}]


def addr(port: int) -> dict:
    return {"socket_address": {"address": HOST, "port_value": port}}


def operator_wasm_filter(envoy_yaml: Path) -> dict:
    """The wasm filter exactly as envoy.yaml (the operator's file) declares it."""
    cfg = yaml.safe_load(envoy_yaml.read_text())
    found = [
        f
        for listener in cfg["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for nf in chain["filters"]
        if nf["name"] == "envoy.filters.network.http_connection_manager"
        for f in nf["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.wasm"
    ]
    if len(found) != 1:
        raise BenchError(f"{envoy_yaml}: expected one envoy.filters.http.wasm, found {len(found)}")
    conf = json.loads(found[0]["typed_config"]["config"]["configuration"]["value"] or "{}")
    if conf.get("whoami_upstream", WHOAMI_CLUSTER) != WHOAMI_CLUSTER:
        raise BenchError(
            f"{envoy_yaml}: whoami_upstream is not {WHOAMI_CLUSTER!r}, which the "
            "bench fixtures call"
        )
    return found[0]


def wasm_filter(
    template: dict, wasm: Path, vm_id: str | None = None, overrides: dict | None = None
) -> dict:
    """`template` (envoy.yaml's wasm block) loading `wasm`; a fixture gets its own vm_id and
    root_id; `overrides` are merged into the plugin configuration."""
    f = copy.deepcopy(template)
    plugin = f["typed_config"]["config"]
    plugin["vm_config"]["code"]["local"]["filename"] = str(wasm)
    if vm_id:
        plugin["vm_config"]["vm_id"] = vm_id
        plugin["root_id"] = vm_id
        plugin["name"] = vm_id
    if overrides:
        conf = json.loads(plugin["configuration"]["value"] or "{}")
        conf.update(overrides)
        plugin["configuration"]["value"] = json.dumps(conf)
    return f


def lua_filter(source: Path) -> dict:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "default_source_code": {"inline_string": source.read_text()},
        },
    }


def _cluster(name: str, port: int) -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": addr(port)}}]}],
        },
    }


def base_config(
    admin_port: int,
    port: int,
    whoami_port: int,
    filters: list[dict],
    *,
    gate_non_sync: bool = False,
    echo_user: bool = False,
) -> dict:
    """One listener answering every route itself, `filters` before the router.

    gate_non_sync: the catch-all (non-sync) route disables the wasm filter, as envoy.yaml does.
    echo_user: answers carry the request's x-user-identifier as x-bench-user."""
    direct = {"direct_response": {"status": 200, "body": {"inline_string": "{}"}}}
    extra = {"response_headers_to_add": ECHO_USER} if echo_user else {}
    routes = [
        {"match": {"safe_regex": {"regex": r}}, **direct, **extra} for r in SYNC_ROUTE_REGEXES
    ]
    routes.append(
        {
            "match": {"prefix": "/"},
            **direct,
            **extra,
            **({"typed_per_filter_config": WASM_OFF} if gate_non_sync else {}),
        }
    )
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "use_remote_address": True,  # as in envoy.yaml
        "normalize_path": True,
        "merge_slashes": True,
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [*filters, ROUTER],
    }
    return {
        "admin": {"address": addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": addr(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_cluster(WHOAMI_CLUSTER, whoami_port)],
        },
    }


FAKE_WHOAMI_LUA = r"""
-- Fake whoami for the memory phase only: 200 {"user_id": "@u<n>:example.test"} for the
-- token "mem_<run>_<n>_...", so a million distinct tokens cost no Synapse logins.
function envoy_on_request(handle)
  local auth = handle:headers():get("authorization") or ""
  local n = auth:match("^Bearer mem_%w+_(%d+)_")
  if n then
    handle:respond({[":status"] = "200", ["content-type"] = "application/json"},
      '{"user_id":"@u' .. tonumber(n) .. ':example.test","is_guest":false,"device_id":"B"}')
  else
    handle:respond({[":status"] = "401", ["content-type"] = "application/json"},
      '{"errcode":"M_UNKNOWN_TOKEN","error":"Unknown token"}')
  end
end
"""


def fake_whoami_config(admin_port: int, port: int, workdir: Path) -> dict:
    """An Envoy answering whoami from the token itself (Lua), fast enough for 1 M tokens."""
    script = workdir / "fake_whoami.lua"
    script.write_text(FAKE_WHOAMI_LUA)
    return base_config(admin_port, port, port, [lua_filter(script)])
