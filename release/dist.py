"""Writes dist/: the release of matrix-sync-router as an operator downloads it (issue 16).

    python3 release/dist.py --wasm target/wasm32-wasip1/release/matrix_sync_router.wasm

(`just dist` runs it after `just build`.) Standard library only, so it runs on a fresh machine
before any virtual environment exists. Everything it writes is a function of its inputs: the
module, the Kong metadata file, the crate version, the commit (`MSR_REVISION`, else `git
rev-parse HEAD`) and the commit's time (`SOURCE_DATE_EPOCH`, else the commit time). No clock,
no user name, no path, no compressor whose output depends on its version: two builds of one
commit produce the same bytes in every file (tests/e2e/test_release.py checks it).

dist/
  matrix_sync_router.wasm         the filter
  matrix_sync_router.meta.json    Kong's filter metadata (config_schema), beside the module
  SHA256SUMS                      `sha256sum -c SHA256SUMS` format: the module, meta.json, the tar
  oci/                            an OCI image layout with two images of the module:
                                    tag <version>: Wasm "compat" image (Istio, Envoy Gateway)
                                    tag <version>-artifact: Wasm OCI artifact (the module)
  matrix_sync_router-<version>-oci.tar   the same layout as one file (a release asset)
  RELEASE_NOTES.md                release/NOTES.md.in filled in (digests, image references)
  deploy/                         deploy/kubernetes/*.yaml with the image and its digest filled in

Why two images. Istio's and Envoy Gateway's image fetchers (pkg/wasm/imagefetcher.go and
internal/wasm/imagefetcher.go, read at their 2026-08 heads) accept three shapes: a Docker image
or an OCI image whose last layer is a tar+gzip holding `plugin.wasm` (the "compat" variant), or
solo.io's two-layer artifact with the media type `application/vnd.module.wasm.content.layer.v1
+wasm`. Neither accepts a single-layer `application/vnd.wasm.content.layer.v1+wasm` artifact. So
the tag the Kubernetes examples use is the compat image; the artifact (config
`application/vnd.wasm.config.v1+json`, the module as its only layer, so that the layer's digest
is the module's SHA-256) is published beside it for clients that take Wasm artifacts (oras).
The compat layer is gzip with *stored* (uncompressed) deflate blocks, written here byte by byte:
its bytes do not depend on the zlib build of the machine, at the cost of ~100 KB per pull.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import shutil
import string
import struct
import subprocess
import sys
import tarfile
import tomllib
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "matrix_sync_router"
META_JSON = REPO / "nginx-wasm" / f"{NAME}.meta.json"
NOTES_TEMPLATE = REPO / "release" / "NOTES.md.in"
# Kubernetes manifests naming the OCI image: written to dist/deploy/ with the digests filled in.
DEPLOY_TEMPLATES = REPO / "deploy" / "kubernetes"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_WASM_CONFIG = "application/vnd.wasm.config.v1+json"
MT_WASM_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
ARTIFACT_SUFFIX = "-artifact"
DEFAULT_IMAGE = "ghcr.io/OWNER/matrix-sync-router"


class DistError(RuntimeError):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def crate_version(manifest: Path = REPO / "Cargo.toml") -> str:
    return tomllib.loads(manifest.read_text())["package"]["version"]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH (reproducible-builds.org), else the time of the commit."""
    value = os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct")
    return int(value)


def revision() -> str:
    """MSR_REVISION, else the commit, with `-dirty` if tracked files differ from it."""
    if os.environ.get("MSR_REVISION"):
        return os.environ["MSR_REVISION"]
    commit = git("rev-parse", "HEAD")
    dirty = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD"]).returncode != 0
    return f"{commit}-dirty" if dirty else commit


def gzip_stored(data: bytes) -> bytes:
    """gzip (RFC 1952) of `data` in stored deflate blocks (RFC 1951 BTYPE 00): the same bytes
    from every implementation. mtime 0, no file name, OS 255 (unknown)."""
    out = bytearray(b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff")
    chunks = [data[i : i + 0xFFFF] for i in range(0, len(data), 0xFFFF)] or [b""]
    for n, chunk in enumerate(chunks):
        final = 1 if n == len(chunks) - 1 else 0
        out += bytes([final]) + struct.pack("<HH", len(chunk), len(chunk) ^ 0xFFFF) + chunk
    out += struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return bytes(out)


def tar_of(files: list[tuple[str, bytes]], mtime: int) -> bytes:
    """A ustar archive of regular files (mode 0644, owner 0:0, no names), in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Layout:
    """An OCI image layout (image-spec 1.1 `image-layout.md`) being written under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.manifests: list[dict] = []
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def blob(self, media_type: str, data: bytes, annotations: dict | None = None) -> dict:
        digest = sha256(data)
        (self.root / "blobs" / "sha256" / digest).write_bytes(data)
        descriptor = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def image(self, tag: str, config: dict, layer: dict, annotations: dict) -> dict:
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config,
            "layers": [layer],
            "annotations": annotations,
        }
        descriptor = self.blob(MT_MANIFEST, canonical_json(manifest))
        self.manifests.append(
            {**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}}
        )
        return descriptor

    def close(self) -> None:
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": self.manifests}
        (self.root / "index.json").write_bytes(canonical_json(index))


def write_oci(root: Path, wasm: bytes, version: str, rev: str, epoch: int) -> dict[str, str]:
    """Both images into an OCI layout at `root`; returns their manifest and layer digests."""
    created = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    created_s = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    common = {
        "org.opencontainers.image.created": created_s,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": rev,
        "org.opencontainers.image.title": "matrix-sync-router",
        "org.opencontainers.image.description": "proxy-wasm filter that pins every Matrix "
        "sync request of one user to one sync worker",
        "org.opencontainers.image.licenses": "Apache-2.0",
    }
    layout = Layout(root)

    # The compat image: one tar+gzip layer holding plugin.wasm (what Istio and Envoy Gateway pull).
    tar = tar_of([("plugin.wasm", wasm)], epoch)
    layer = layout.blob(MT_TAR_GZIP_LAYER, gzip_stored(tar))
    config = {
        "created": created_s,
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{sha256(tar)}"]},
        "history": [{"created": created_s, "created_by": f"just dist ({version})"}],
    }
    config_desc = layout.blob(MT_IMAGE_CONFIG, canonical_json(config))
    compat = layout.image(
        version, config_desc, layer, {**common, "module.wasm.image/variant": "compat"}
    )

    # The Wasm OCI artifact: the module itself is the only layer.
    wasm_layer = layout.blob(
        MT_WASM_LAYER, wasm, {"org.opencontainers.image.title": f"{NAME}.wasm"}
    )
    artifact = layout.image(
        version + ARTIFACT_SUFFIX, layout.blob(MT_WASM_CONFIG, b"{}"), wasm_layer, common
    )
    layout.close()
    return {
        "compat_manifest": compat["digest"],
        "compat_layer": layer["digest"],
        "artifact_manifest": artifact["digest"],
        "artifact_layer": wasm_layer["digest"],
    }


def tar_directory(root: Path, arcname: str, mtime: int) -> bytes:
    """`root` as a tar (sorted names, fixed metadata)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return tar_of([(f"{arcname}/{p.relative_to(root)}", p.read_bytes()) for p in files], mtime)


def build(wasm_path: Path, out: Path, image: str) -> dict[str, str]:
    wasm = wasm_path.read_bytes()
    if wasm[:4] != b"\0asm":
        raise DistError(f"{wasm_path} is not a WebAssembly module")
    version, rev, epoch = crate_version(), revision(), source_date_epoch()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / f"{NAME}.wasm").write_bytes(wasm)
    meta = META_JSON.read_bytes()
    (out / f"{NAME}.meta.json").write_bytes(meta)
    digests = write_oci(out / "oci", wasm, version, rev, epoch)
    oci_tar = f"{NAME}-{version}-oci.tar"
    (out / oci_tar).write_bytes(tar_directory(out / "oci", "oci", epoch))
    sums = "".join(
        f"{sha256((out / name).read_bytes())}  {name}\n"
        for name in (f"{NAME}.wasm", f"{NAME}.meta.json", oci_tar)
    )
    (out / "SHA256SUMS").write_text(sums)

    values = {
        "version": version,
        "revision": rev,
        "date": datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d"),
        "wasm_sha256": sha256(wasm),
        "wasm_size": str(len(wasm)),
        "meta_sha256": sha256(meta),
        "image": image,
        "artifact_tag": version + ARTIFACT_SUFFIX,
        "oci_tar": oci_tar,
        "toolchain": tomllib.loads((REPO / "rust-toolchain.toml").read_text())["toolchain"][
            "channel"
        ],
        **digests,
    }
    values["compat_manifest_hex"] = digests["compat_manifest"].removeprefix("sha256:")
    notes = string.Template(NOTES_TEMPLATE.read_text()).substitute(values)
    (out / "RELEASE_NOTES.md").write_text(notes)
    (out / "deploy").mkdir()
    for template in sorted(DEPLOY_TEMPLATES.glob("*.yaml")):
        text = string.Template(template.read_text()).substitute(values)
        (out / "deploy" / template.name).write_text(text)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--wasm", type=Path, required=True, help="the built (wasm-opt'd) module")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument(
        "--image",
        default=os.environ.get("MSR_IMAGE", DEFAULT_IMAGE),
        help="registry repository the release notes name (the workflow passes ghcr.io/<repo>)",
    )
    args = parser.parse_args(argv)
    try:
        v = build(args.wasm, args.out, args.image)
    except (DistError, OSError, subprocess.CalledProcessError, KeyError) as exc:
        print(f"dist: {exc}", file=sys.stderr)
        return 1
    print(f"dist: matrix-sync-router {v['version']} ({v['revision']}) in {args.out}")
    print(f"  {NAME}.wasm  sha256:{v['wasm_sha256']}  ({v['wasm_size']} bytes)")
    print(f"  oci {v['version']}: {v['compat_manifest']} (compat image, Istio / Envoy Gateway)")
    print(f"  oci {v['artifact_tag']}: {v['artifact_manifest']} (layer = the module)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
