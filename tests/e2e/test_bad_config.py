"""A bad plugin configuration makes the real Envoy refuse to start, naming the field."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from msrtest.env import WASM, free_ports
from msrtest.envoy import render_envoy_config
from msrtest.procs import venv_bin

BAD = [
    ({"cache_capacity": 0}, "cache_capacity"),
    ({"cache_capcity": 5}, "cache_capcity"),
    ({"whoami_timeout_ms": "2s"}, "whoami_timeout_ms"),
    ({"sync_paths": ["(unclosed"]}, "sync_paths[0]"),
    ({"header_name": "Authorization"}, "header_name"),
    ({"header_name": "cookie"}, "header_name"),  # a header Synapse or the proxy interprets
    ({"whoami_path": "/" + "a" * (1 << 20)}, "whoami_path"),  # 1 MiB: over the 256-byte bound
]


def _run_envoy(tmp_path, override: dict | None, *mode: str) -> subprocess.CompletedProcess:
    ports = free_ports(6)
    cfg = render_envoy_config(
        listener_port=ports[0],
        admin_port=ports[1],
        main_port=ports[2],
        worker_ports=ports[3:5],
        whoami_port=ports[5],
        wasm=WASM.resolve(),
        access_log=tmp_path / "access.log",
        plugin_overrides=override,
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [venv_bin("envoy"), *mode, "-c", str(path), "--disable-hot-restart"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("override,field", BAD, ids=[f for _, f in BAD])
def test_envoy_refuses_a_bad_plugin_config(tmp_path, override, field):
    proc = _run_envoy(tmp_path, override)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, "Envoy started with a bad plugin configuration"
    lines = [line for line in log.splitlines() if "invalid configuration" in line]
    assert len(lines) == 1, log[-3000:]
    assert f"field `{field}`" in lines[0], lines[0]


def test_validate_mode_runs_the_filter_configuration(tmp_path):
    """`envoy --mode validate` (what docs/envoy.md tells operators to run) loads the filter and
    runs its configuration: the shipped one passes, a bad one fails naming the field."""
    good = _run_envoy(tmp_path, None, "--mode", "validate")
    assert good.returncode == 0, (good.stdout + good.stderr)[-3000:]
    bad = _run_envoy(tmp_path, {"cache_ttl_s": 0}, "--mode", "validate")
    assert bad.returncode != 0
    assert "field `cache_ttl_s`" in bad.stdout + bad.stderr
