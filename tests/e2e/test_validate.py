"""`just validate FILE` (msrtest.validate): an operator's edited Envoy or nginx config is
checked with the built filter in place, and the last line is the filter's own error naming the
field. The Envoy verdicts are the real Envoy's (`envoy --mode validate`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msrtest.env import ENVOY_YAML, REPO, WASM
from msrtest.procs import just_executable

CHECK_CONFIG = REPO / "target" / "debug" / "check-config"
NGINX_CONF = REPO / "nginx-wasm" / "nginx.conf"


def validate(path: Path) -> tuple[int, list[str]]:
    for what, file in (("the filter", WASM), ("check-config", CHECK_CONFIG)):
        if not file.is_file():
            pytest.fail(f"{what} is not built: {file} is missing (`just e2e` builds it)")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "msrtest.validate",
            "--wasm",
            str(WASM),
            "--check-config",
            str(CHECK_CONFIG),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not proc.stderr.strip(), proc.stderr
    return proc.returncode, proc.stdout.splitlines()


def edited_envoy_yaml(tmp_path: Path, fields: dict) -> Path:
    """envoy.yaml as shipped, with plugin configuration fields changed as an operator would."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (wasm,) = [f for f in hcm["typed_config"]["http_filters"] if f["name"].endswith(".wasm")]
    conf = wasm["typed_config"]["config"]["configuration"]
    conf["value"] = json.dumps({**json.loads(conf["value"]), **fields}, indent=2)
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_shipped_envoy_yaml_is_valid():
    code, lines = validate(ENVOY_YAML)
    assert code == 0, lines
    assert any("`envoy --mode validate`" in line and "accepts it" in line for line in lines), lines
    assert lines[-1] == f"{ENVOY_YAML}: valid"


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"cache_ttl_s": 0}, "cache_ttl_s"),
        ({"cache_capcity": 5}, "cache_capcity"),
        ({"sync_paths": ["(unclosed"]}, "sync_paths[0]"),
    ],
    ids=["cache_ttl_s", "typo", "sync_paths"],
)
def test_edited_envoy_yaml_names_the_bad_field_last(tmp_path, fields, field):
    code, lines = validate(edited_envoy_yaml(tmp_path, fields))
    assert code == 1, lines
    assert any("`envoy --mode validate`" in line and "refuses it" in line for line in lines), lines
    assert f"field `{field}`" in lines[-1], lines
    assert lines[-1].strip().startswith("matrix-sync-router: invalid configuration"), lines


def test_whoami_upstream_must_name_a_cluster(tmp_path):
    code, lines = validate(edited_envoy_yaml(tmp_path, {"whoami_upstream": "synapse_main_typo"}))
    assert code == 1, lines
    assert any("`synapse_main_typo` names no cluster" in line for line in lines), lines


def test_shipped_nginx_conf_is_valid():
    code, lines = validate(NGINX_CONF)
    assert code == 0, lines
    assert any("accepts its configuration (check-config, ngx profile)" in line for line in lines)
    if not os.environ.get("NGINX_WASM_BIN"):
        assert any(
            line.startswith("skipped: `nginx -t`: NGINX_WASM_BIN is not set") for line in lines
        )


def validate_edited_nginx_conf(tmp_path, old: str, new: str) -> tuple[int, list[str]]:
    """`just validate` on nginx.conf with `old` (which must be there) replaced by `new`."""
    text = NGINX_CONF.read_text()
    assert old in text
    path = tmp_path / "nginx.conf"
    path.write_text(text.replace(old, new))
    return validate(path)


def test_edited_nginx_conf_names_the_bad_field_last(tmp_path):
    code, lines = validate_edited_nginx_conf(
        tmp_path,
        '"whoami_authority":"localhost"',
        '"whoami_authority":"localhost","whoami_timeout_ms":0',
    )
    assert code == 1, lines
    assert "field `whoami_timeout_ms`" in lines[-1], lines


def test_nginx_conf_without_the_shm_kv_zone_is_refused(tmp_path):
    """ngx_wasm_module traps on the cache's first shared-data access when the zone named like
    `shared_data_prefix` is missing; check-config plays the zones nginx.conf declares."""
    code, lines = validate_edited_nginx_conf(tmp_path, "shm_kv msr 16m;", "")
    assert code == 1, lines
    assert any("needs `shm_kv <shared_data_prefix> SIZE;`" in line for line in lines), lines
    assert "shm" in lines[-1], lines


def test_just_validate_is_the_one_command(tmp_path):
    """What docs/configuration.md tells operators to run: `just validate FILE`, the field named
    last, and no message of just's own after it."""
    just = just_executable()
    if not just:
        pytest.skip("`just` not found: run through `just e2e`, or put just on PATH")
    path = edited_envoy_yaml(tmp_path, {"cache_ttl_s": 0})
    proc = subprocess.run(
        [just, "validate", str(path)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode != 0
    assert "field `cache_ttl_s`" in proc.stdout.splitlines()[-1], proc.stdout
    assert "error: recipe" not in proc.stderr, proc.stderr


def test_nginx_conf_must_say_proxy_ngx_wasm_module(tmp_path):
    """Without `"proxy": "ngx_wasm_module"` the filter accepts the configuration but would
    dispatch whoami like Envoy does; validate says so."""
    code, lines = validate_edited_nginx_conf(tmp_path, '"proxy":"ngx_wasm_module",', "")
    assert code == 1, lines
    assert any('set "proxy": "ngx_wasm_module"' in line for line in lines), lines
