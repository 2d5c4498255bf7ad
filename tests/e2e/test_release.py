"""The release as operators get it (issue 16), all on 127.0.0.1 with real parts.

- dist/ is reproducible: a second `just dist` in another directory, with another cargo home,
  writes the same bytes in every file.
- Envoy 1.40 loads the module from dist/ served over HTTP through envoy.yaml's commented-out
  `remote` code source (as shipped, only its URL and digest filled in) with the SHA-256 from
  SHA256SUMS, and routes every device of a user to one worker; with a wrong digest Envoy refuses
  the module and says so.
- dist/oci's two images go to a real registry (Debian's docker-registry) with skopeo and come
  back (skopeo, and oras for the artifact) with the same digests; the module inside is dist's.

`just e2e` runs `just dist` and `just release-tools` first.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import tarfile
import textwrap
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from msrtest.env import ENVOY_YAML, HOST, REPO, free_ports
from msrtest.envoy import Envoy, uncomment_block
from msrtest.httpclient import http_request
from msrtest.procs import Process, just_executable, wait_until

DIST = REPO / "dist"
MODULE = "matrix_sync_router.wasm"
SUM_LINES = ("matrix_sync_router.wasm", "matrix_sync_router.meta.json")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crate_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


@pytest.fixture(scope="module")
def sums() -> dict[str, str]:
    """dist/SHA256SUMS as {file: hex digest}, checked against the files it names."""
    path = DIST / "SHA256SUMS"
    if not path.is_file():
        pytest.fail("dist/ is missing: run `just dist` (`just e2e` does)")
    entries = dict(reversed(line.split("  ", 1)) for line in path.read_text().splitlines())
    for name in SUM_LINES:
        assert entries.get(name) == sha256((DIST / name).read_bytes()), name
    return entries


def oci_index(root: Path) -> dict[str, dict]:
    """An OCI layout's manifests by tag."""
    index = json.loads((root / "index.json").read_text())
    return {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}


def oci_blob(root: Path, digest: str) -> bytes:
    algorithm, hexdigest = digest.split(":", 1)
    data = (root / "blobs" / algorithm / hexdigest).read_bytes()
    assert sha256(data) == hexdigest, f"{root}: blob {digest} does not match its name"
    return data


def plugin_wasm(layer: bytes) -> bytes:
    """plugin.wasm from a compat image's tar+gzip layer."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        member = tar.extractfile("plugin.wasm")
        assert member is not None
        return member.read()


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------------------------
# reproducible


def test_a_second_build_elsewhere_writes_the_same_dist(tmp_path, sums):
    """The working tree copied to another directory, built there with its own target directory
    and another cargo home (the same crates, by a symlink: no network): every file of dist/ is
    byte for byte the same. The commit time and revision come from the environment, as in any
    rebuild from a source archive."""
    just = just_executable()
    if just is None:
        pytest.fail("`just` not found (run through `just e2e`)")
    files = (
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "another" / "checkout"
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():  # deleted but not yet committed files are listed too
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    cargo_home = tmp_path / "cargo-home"
    cargo_home.mkdir()
    real_home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    (cargo_home / "registry").symlink_to(real_home / "registry")

    compat = json.loads(oci_blob(DIST / "oci", oci_index(DIST / "oci")[crate_version()]["digest"]))
    annotations = compat["annotations"]
    created = datetime.datetime.strptime(
        annotations["org.opencontainers.image.created"], "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=datetime.UTC)
    epoch = str(int(created.timestamp()))
    env = {
        **os.environ,
        "CARGO_HOME": str(cargo_home),
        "CARGO_NET_OFFLINE": "true",
        "SOURCE_DATE_EPOCH": epoch,
        "MSR_REVISION": annotations["org.opencontainers.image.revision"],
    }
    run = subprocess.run(
        ["nice", "-n", "5", just, "dist"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ours, theirs = tree(DIST), tree(copy / "dist")
    assert sorted(ours) == sorted(theirs)
    differ = [name for name in ours if ours[name] != theirs[name]]
    assert not differ, f"files that differ between the two builds: {differ}"
    assert sha256(theirs[MODULE]) == sums[MODULE]
    print(f"\nreproducible: {MODULE} sha256:{sums[MODULE]} from {REPO} and {copy}")


def test_release_notes_print_the_digests(sums):
    notes = (DIST / "RELEASE_NOTES.md").read_text()
    index = oci_index(DIST / "oci")
    version = crate_version()
    assert notes.startswith(f"# matrix-sync-router {version}\n")
    assert f"`{sums[MODULE]}`" in notes and f"sha256: {sums[MODULE]}" in notes
    assert f":{version}@{index[version]['digest']}" in notes
    assert f":{version}-artifact@{index[version + '-artifact']['digest']}" in notes
    assert "$" not in notes.replace("$ ", ""), "a template field was left unfilled"


# --------------------------------------------------------------------------------------------
# Envoy loads the release by URL and digest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the test reads `served` instead
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server for `directory` on 127.0.0.1; yields (port, list of paths served)."""
    served: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self):
            served.append(self.path)
            super().do_GET()

    handler = functools.partial(Handler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], served
    finally:
        server.shutdown()
        server.server_close()


def shipped_remote_block() -> dict:
    """envoy.yaml's commented-out `remote` code source, uncommented as an operator would."""
    _, block = uncomment_block(ENVOY_YAML.read_text(), "remote-code")
    return yaml.safe_load(textwrap.dedent("\n".join(block)))["remote"]


def remote_envoy(e2e_stack, name: str, port: int, digest: str) -> Envoy:
    """An Envoy running envoy.yaml with the shipped remote block in place of `local` (its URL
    pointed at `port`, its sha256 `digest`) and a cluster of that name for the download."""
    envoy = e2e_stack.prepare_envoy(
        name, log_args=("--log-level", "info", "--component-log-level", "config:debug")
    )
    remote = shipped_remote_block()
    remote["http_uri"]["uri"] = f"http://{HOST}:{port}/{MODULE}"
    remote["sha256"] = digest
    hcm = envoy.cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (wasm,) = [
        f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.wasm"
    ]
    wasm["typed_config"]["config"]["vm_config"]["code"] = {"remote": remote}
    cluster = remote["http_uri"]["cluster"]
    envoy.cfg["static_resources"]["clusters"].append(
        {
            "name": cluster,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": cluster,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": HOST, "port_value": port}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
    )
    return envoy


def test_envoy_loads_the_release_by_url_and_digest_and_routes_by_user(e2e_stack, sums):
    version = crate_version()
    with serve(DIST) as (port, served):
        envoy = remote_envoy(e2e_stack, "remote", port, sums[MODULE])
        envoy.start()
        try:
            assert f"/{MODULE}" in served, "Envoy did not download the module"
            log = envoy.log.read_text()
            assert f"configured: matrix-sync-router {version}, " in log
            assert "data is invalid" not in log
            for n in range(2):
                devices = e2e_stack.user_with_devices(envoy, f"remote{n}", 3)
                workers = set()
                for device in devices * 2:
                    r = envoy.sync(device.token)
                    assert r.status == 200, r.body[:200]
                    assert envoy.log_entry(r.request_id)["user"] == device.user_id
                    workers.add(envoy.worker_of(r))
                assert len(workers) == 1, f"{devices[0].user_id}'s devices on {workers}"
        finally:
            envoy.stop()


def test_envoy_refuses_the_module_with_a_wrong_digest(e2e_stack, sums):
    other = sha256(b"not the module")
    with serve(DIST) as (port, served):
        envoy = remote_envoy(e2e_stack, "wrongdigest", port, other)
        envoy.start()
        try:
            wait_until(
                lambda: "Plugin matrix_sync_router failed to load" in envoy.log.read_text(),
                30,
                "Envoy to give up on the module",
            )
            log = envoy.log.read_text()
            url = f"http://{HOST}:{port}/{MODULE}"
            # Downloaded (so the refusal is the digest's), found invalid, refused.
            assert f"/{MODULE}" in served
            assert f"fetch remote data [uri = {url}]: data is invalid" in log
            assert "Retry limit exceeded for fetching data from remote data source." in log
            assert "configured: matrix-sync-router" not in log
            # Fail closed: requests are answered 503 by Envoy and never reach Synapse.
            r = envoy.sync("syt_dXNlcg_NotARealTokenAtAll_0abcde")
            assert r.status == 503
            entry = envoy.log_entry(r.request_id) if r.request_id else None
            assert entry is None or entry["upstream_host"] is None, entry
        finally:
            envoy.stop()


# --------------------------------------------------------------------------------------------
# OCI: push to a real registry, pull back


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Debian's docker-registry (distribution 2.8) on a free 127.0.0.1 port with a temporary
    storage directory; yields its address."""
    binary = shutil.which("docker-registry")
    if binary is None or shutil.which("skopeo") is None:
        pytest.skip(
            "docker-registry or skopeo is not installed (`just release-tools` installs the "
            "Debian packages; it could not here)"
        )
    work = tmp_path_factory.mktemp("registry")
    (port,) = free_ports(1)
    config = {
        "version": 0.1,
        "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(work / "storage")}},
        "http": {"addr": f"{HOST}:{port}"},
    }
    (work / "config.yml").write_text(yaml.safe_dump(config))
    process = Process(
        "docker-registry",
        [binary, "serve", str(work / "config.yml")],
        log=work / "registry.log",
        cwd=work,
    )
    try:
        wait_until(
            lambda: http_request(port, "GET", "/v2/", timeout=2).status == 200,
            30,
            "docker-registry /v2/",
            check=process.check_alive,
        )
        yield f"{HOST}:{port}"
    finally:
        process.stop()


def skopeo(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"skopeo {' '.join(args)}: {run.stderr}"
    return run


def test_oci_images_round_trip_through_a_registry(registry, sums, tmp_path):
    version = crate_version()
    ours = oci_index(DIST / "oci")
    module = (DIST / MODULE).read_bytes()
    repo = f"{registry}/matrix-sync-router"
    for tag in (version, f"{version}-artifact"):
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--preserve-digests",
            f"oci:{DIST / 'oci'}:{tag}",
            f"docker://{repo}:{tag}",
        )
        raw = skopeo("inspect", "--tls-verify=false", "--raw", f"docker://{repo}:{tag}").stdout
        assert f"sha256:{sha256(raw.encode())}" == ours[tag]["digest"], tag
        pulled = tmp_path / f"pulled-{tag}"
        skopeo("copy", "--src-tls-verify=false", f"docker://{repo}:{tag}", f"oci:{pulled}:{tag}")
        (descriptor,) = oci_index(pulled).values()
        assert descriptor["digest"] == ours[tag]["digest"], tag
        manifest = json.loads(oci_blob(pulled, descriptor["digest"]))
        (layer,) = manifest["layers"]
        blob = oci_blob(pulled, layer["digest"])
        if tag == version:
            # The compat image Istio and Envoy Gateway pull: plugin.wasm in a tar+gzip layer.
            assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
            assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
            assert plugin_wasm(blob) == module
        else:
            # The Wasm artifact: the layer is the module, so its digest is the module's.
            assert layer["mediaType"] == "application/vnd.wasm.content.layer.v1+wasm"
            assert manifest["config"]["mediaType"] == "application/vnd.wasm.config.v1+json"
            assert layer["digest"] == f"sha256:{sums[MODULE]}"
            assert blob == module


def test_oras_pulls_the_module_from_the_artifact(registry, sums, tmp_path):
    """A second client: oras (PyPI) pulls the artifact tag and writes the module under the
    layer's title; its bytes are dist's."""
    import oras.client

    tag = f"{crate_version()}-artifact"
    target = f"{registry}/matrix-sync-router-oras:{tag}"
    skopeo(
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{DIST / 'oci'}:{tag}",
        f"docker://{target}",
    )
    client = oras.client.OrasClient(hostname=registry, insecure=True)
    files = client.pull(target=target, outdir=str(tmp_path / "oras"))
    assert [Path(f).name for f in files] == [MODULE]
    assert sha256(Path(files[0]).read_bytes()) == sums[MODULE]
