"""nginx-wasm/kong/ (kong.yml, kong.conf) and the filter's meta.json, checked offline.

Kong cannot be installed here (no package for this platform; Kong removed ngx_wasm_module from
its builds after 3.9), so nothing in these files has been run by Kong. What can be checked without
it is: the metadata file passes the schema Kong 3.9.3 validates it with (kong/runloop/wasm.lua,
FILTER_META_SCHEMA: config_schema must be a JSON Schema draft-4 document); the filter config in
kong.yml passes that config_schema (draft-4, as Kong forces) AND the compiled filter's own
parser; and the two-hop wiring is consistent: listeners, routes, priorities, the upstream's hash
header, the routing-key variable and the shm_kv zone all name the same things. The schema's
equality with the filter's configuration type (fields, types, bounds, defaults) is proved in the
harness suite (tests/harness/tests/suite/kong_schema.rs).
"""

from __future__ import annotations

import ipaddress
import re

import jsonschema
import pytest
import yaml

from msrtest import proxyconf
from msrtest.env import WASM

FILTER = "matrix_sync_router"
ROUTE_FIELDS = {"paths", "hosts", "methods", "headers", "snis", "sources", "destinations"}

# kong/runloop/wasm.lua (3.9.3), FILTER_META_SCHEMA; json_schema.metaschema is draft-4's.
KONG_FILTER_META_SCHEMA = {
    "type": "object",
    "properties": {
        "config_schema": jsonschema.Draft4Validator.META_SCHEMA,
        "metrics": {
            "type": "object",
            "properties": {
                "label_patterns": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["label", "pattern"],
                        "properties": {
                            "label": {"type": "string"},
                            "pattern": {"type": "string"},
                        },
                    },
                }
            },
        },
    },
}


@pytest.fixture(scope="module")
def kong_yml() -> dict:
    return yaml.safe_load(proxyconf.KONG_YML.read_text())


@pytest.fixture(scope="module")
def kong_conf() -> dict[str, str]:
    """kong.conf as Kong reads it: `key = value`, a `#` not escaped starts a comment."""
    conf = {}
    for line in proxyconf.KONG_CONF.read_text().splitlines():
        line = re.sub(r"\s*(?<!\\)#.*$", "", line).replace("\\#", "#").strip()
        if line:
            key, sep, value = line.partition("=")
            assert sep, f"kong.conf: not `key = value`: {line!r}"
            assert key.strip() not in conf, f"kong.conf: {key.strip()} twice"
            conf[key.strip()] = value.strip()
    return conf


def routes(kong_yml) -> dict[str, dict]:
    """Every route by name, with the name of its service."""
    found = {}
    for service in kong_yml["services"]:
        for route in service.get("routes", []):
            assert route["name"] not in found, f"route {route['name']} twice"
            found[route["name"]] = {**route, "service": service["name"]}
    return found


def services(kong_yml) -> dict[str, dict]:
    return {s["name"]: s for s in kong_yml["services"]}


def the_filter(kong_yml) -> tuple[dict, dict]:
    """(filter chain, the matrix_sync_router filter entry in it)."""
    (chain,) = [
        c for c in kong_yml["filter_chains"] if any(f["name"] == FILTER for f in c["filters"])
    ]
    (entry,) = [f for f in chain["filters"] if f["name"] == FILTER]
    return chain, entry


def listeners(kong_conf) -> list[tuple[str, int]]:
    """(address, port) of each proxy_listen entry."""
    result = []
    for entry in kong_conf["proxy_listen"].split(","):
        addr, _, port = entry.split()[0].rpartition(":")
        result.append((addr, int(port)))
    return result


def injected(kong_conf, prefix: str, directive: str) -> str:
    """The value of an injected nginx directive (`nginx_<prefix>_<directive> = value`)."""
    return kong_conf[f"nginx_{prefix}_{directive}"]


# --------------------------------------------------------------------------------------------
# meta.json


def test_meta_json_passes_kongs_metadata_schema():
    meta = proxyconf.json.loads(proxyconf.META_JSON.read_text())
    jsonschema.Draft4Validator(KONG_FILTER_META_SCHEMA).validate(meta)
    jsonschema.Draft4Validator.check_schema(meta["config_schema"])
    # Kong overwrites `$schema` with draft-4's id; the file says the same.
    assert meta["config_schema"]["$schema"] == "http://json-schema.org/draft-04/schema#"
    assert proxyconf.META_JSON.name == f"{FILTER}.meta.json"  # Kong looks for <filter>.meta.json


def test_the_schema_refuses_what_the_filter_refuses():
    """A sanity check of the validator itself: wrong types, unknown fields and out-of-range
    values are errors, and Kong would reject such a filter chain before the filter saw it."""
    base = {"proxy": "ngx_wasm_module", "whoami_upstream": "127.0.0.1:8008"}
    assert proxyconf.schema_errors(base) == []
    for bad in [
        {"cache_capacity": "5"},
        {"cache_capacity": 0},
        {"cache_capcity": 5},
        {"header_name": "X-Up"},
        {"nginx_variable": "bad-name"},
        {"proxy": "haproxy"},
        {"sync_paths": []},
    ]:
        assert proxyconf.schema_errors({**base, **bad}), bad
    assert proxyconf.schema_errors({"whoami_upstream": "127.0.0.1:8008"}), "proxy is required"


# --------------------------------------------------------------------------------------------
# kong.yml


def test_kong_yml_is_a_declarative_config_of_known_entities(kong_yml):
    assert kong_yml["_format_version"] == "3.0"
    assert set(kong_yml) <= {"_format_version", "services", "upstreams", "filter_chains"}
    upstream_names = {u["name"] for u in kong_yml["upstreams"]}
    for service in kong_yml["services"]:
        assert ("url" in service) != ("host" in service), service["name"]
        if "host" in service:
            assert service["protocol"] == "http" and isinstance(service["port"], int)
        assert service.get("retries", 5) >= 0
        for key in ("connect_timeout", "write_timeout", "read_timeout"):
            assert isinstance(service[key], int) and service[key] > 0, (service["name"], key)
    for name, route in routes(kong_yml).items():
        has_expression = "expression" in route
        has_fields = bool(ROUTE_FIELDS & set(route))
        # kong/db/schema/entities/routes.lua: one or the other, never both, never neither.
        assert has_expression != has_fields, name
        if has_expression:
            assert isinstance(route["priority"], int) and 0 <= route["priority"] < 2**46, name
        assert route["strip_path"] is False and route["preserve_host"] is True, name
    for upstream in kong_yml["upstreams"]:
        assert upstream["targets"], upstream["name"]
        for target in upstream["targets"]:
            host, _, port = target["target"].rpartition(":")
            assert host and 0 < int(port) < 65536, target
    workers = services(kong_yml)["msr-sync-workers"]
    assert workers["host"] in upstream_names


def test_the_filter_config_passes_the_schema_and_the_filter_parser(kong_yml, kong_conf):
    """Kong validates the config with config_schema (draft-4), JSON-encodes it and hands it to
    the filter's on_configure: both must accept it, with the zone and variable kong.conf
    declares (the harness plays ngx_wasm_module with exactly those)."""
    _, entry = the_filter(kong_yml)
    config = entry["config"]
    assert entry.get("enabled", True) is True
    assert proxyconf.schema_errors(config) == []
    zones = [
        k.removeprefix("nginx_wasm_shm_kv_")
        for k in kong_conf
        if k.startswith("nginx_wasm_shm_kv_")
    ]
    set_var = re.fullmatch(r"\$(\w+) ''", injected(kong_conf, "proxy", "set"))
    assert set_var, kong_conf["nginx_proxy_set"]
    checked = proxyconf.filter_configure(WASM, proxyconf.json.dumps(config), zones=zones)
    assert checked.accepted, checked.output
    # Without the zone kong.conf declares, the same config is refused (the check has teeth).
    assert not proxyconf.filter_configure(
        WASM, proxyconf.json.dumps(config), zones=["other"]
    ).accepted


def test_the_two_hops_are_wired_to_each_other(kong_yml, kong_conf):
    _, entry = the_filter(kong_yml)
    config = entry["config"]
    rts = routes(kong_yml)
    public, internal = rts["msr-sync-public"], rts["msr-sync-internal"]
    hop, workers = services(kong_yml)["msr-sync-hop"], services(kong_yml)["msr-sync-workers"]

    # The internal listener: loopback only, and the port the internal route matches.
    port = int(re.fullmatch(r"net\.dst\.port == (\d+)", internal["expression"])[1])
    bound = [addr for addr, p in listeners(kong_conf) if p == port]
    assert bound and all(ipaddress.ip_address(a).is_loopback for a in bound), bound
    assert hop["url"] == f"http://127.0.0.1:{port}"
    assert hop["retries"] == 0
    assert internal["service"] == "msr-sync-workers" and public["service"] == "msr-sync-hop"
    # Only Kong's `location /` gets the injected proxy_set_header; unbuffered routes skip it.
    assert public.get("request_buffering", True) and public.get("response_buffering", True)
    # Checked first on every request, so a request on the internal port never runs the filter.
    assert internal["priority"] > max(
        r.get("priority", 0) for n, r in rts.items() if n != "msr-sync-internal"
    )
    assert kong_conf["router_flavor"] == "expressions"

    # The filter runs on the public route only, writing the variable kong.conf sends upstream.
    chain, _ = the_filter(kong_yml)
    assert chain.get("route") == "msr-sync-public" and "service" not in chain
    assert config["proxy"] == "ngx_wasm_module"
    variable = config["nginx_variable"]
    assert injected(kong_conf, "proxy", "set") == f"${variable} ''"
    name, value = injected(kong_conf, "location", "proxy_set_header").split()
    assert value == f"${variable}"

    # The second hop hashes on that header; token-less requests on another, distinct header.
    (upstream,) = [u for u in kong_yml["upstreams"] if u["name"] == workers["host"]]
    assert upstream["algorithm"] == "consistent-hashing"
    assert (upstream["hash_on"], upstream["hash_on_header"]) == ("header", name.lower())
    assert upstream["hash_fallback"] == "header"
    assert upstream["hash_fallback_header"] != upstream["hash_on_header"]

    # The public route takes the same path family as the filter's sync_paths.
    regexes = re.findall(r'http\.path ~ "([^"]*)"', public["expression"])
    assert regexes and not proxyconf.same_family_as_the_filter(regexes)
    assert proxyconf.schema_errors(config) == [] and "sync_paths" not in config

    assert kong_conf["wasm"] == "on"
    assert f"nginx_wasm_shm_kv_{config.get('shared_data_prefix', 'msr')}" in kong_conf
