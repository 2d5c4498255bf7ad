"""Offline checks of the shipped proxy configurations (nginx-wasm/nginx.conf, nginx-wasm/kong/).

They run without nginx or Kong: the plugin configurations inside those files are handed to the
compiled filter's own configuration parser through the harness's `configure-check` binary (the
real .wasm, its real on_configure, under the ngx_wasm_module host profile with the `shm_kv`
zones and nginx variables the file declares), and to Kong's validator, JSON Schema draft-4, with
the filter's matrix_sync_router.meta.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import subprocess
from pathlib import Path

import jsonschema

import stack

META_JSON = stack.REPO / "nginx-wasm" / "matrix_sync_router.meta.json"
NGINX_CONF = stack.REPO / "nginx-wasm" / "nginx.conf"
KONG_YML = stack.REPO / "nginx-wasm" / "kong" / "kong.yml"
KONG_CONF = stack.REPO / "nginx-wasm" / "kong" / "kong.conf"
CONFIGURE_CHECK = stack.REPO / "target" / "debug" / "configure-check"

# Paths on which a proxy's sync-route pattern must agree with the filter's default sync_paths.
SYNC_SAMPLES = [
    "/_matrix/client/v3/events",
    "/_matrix/client/r0/initialSync",
    "/_matrix/client/unstable/sync",
    "/_matrix/client/api/v1/rooms/!room:example.org/initialSync",
    "/_matrix/client/v3/sync",
    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
]
NOT_SYNC_SAMPLES = [
    "/_matrix/client/v3/sync/",
    "/_matrix/client/v4/sync",
    "/_matrix/client/v3/rooms/!room:example.org/messages",
    "/_matrix/client/v3/rooms/a/b/initialSync",
    "/_matrix/client/unstable/org_matrix_simplified_msc3575/sync",
    "/prefix/_matrix/client/v3/sync",
    "/_matrix/client/v3/login",
    "/_matrix/federation/v1/send/1",
]


def config_schema() -> dict:
    return json.loads(META_JSON.read_text())["config_schema"]


def schema_errors(config) -> list[str]:
    """What Kong's draft-4 validation of a filter config against config_schema reports."""
    validator = jsonschema.Draft4Validator(config_schema())
    return [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in validator.iter_errors(config)]


def matches(patterns: list[str], path: str) -> bool:
    return any(re.search(p, path) for p in patterns)


def same_family_as_the_filter(patterns: list[str]) -> list[str]:
    """Sample paths on which `patterns` and the filter's default sync_paths disagree."""
    defaults = config_schema()["properties"]["sync_paths"]["default"]
    return [
        p
        for p in SYNC_SAMPLES + NOT_SYNC_SAMPLES
        if matches(patterns, p) != matches(defaults, p)
    ]


# --------------------------------------------------------------------------------------------
# the filter's own parser, through the harness


@dataclasses.dataclass
class Checked:
    accepted: bool
    logs: list[str]


@functools.lru_cache(maxsize=1)
def configure_check_bin() -> Path:
    """Builds (if needed) the harness's configure-check binary; `just harness` already has."""
    subprocess.run(
        ["cargo", "build", "-q", "-p", "proxy-wasm-harness", "--bin", "configure-check"],
        cwd=stack.REPO,
        check=True,
        timeout=1800,
    )
    return CONFIGURE_CHECK


def filter_configure(
    wasm: Path,
    config: str | bytes,
    *,
    host: str = "ngx",
    zones: list[str] = (),
    ngx_vars: list[str] = (),
    clusters: list[str] = (),
) -> Checked:
    """Starts the compiled filter in the harness and configures it with `config`."""
    argv = [str(configure_check_bin()), "--host", host]
    for flag, values in (("--zone", zones), ("--ngx-var", ngx_vars), ("--cluster", clusters)):
        for v in values:
            argv += [flag, v]
    argv.append(str(Path(wasm).resolve()))
    data = config.encode() if isinstance(config, str) else config
    proc = subprocess.run(argv, input=data, capture_output=True, timeout=120)
    out = proc.stdout.decode(errors="replace").splitlines()
    if proc.returncode not in (0, 1) or not out:
        raise stack.StackError(
            f"configure-check failed ({proc.returncode}): {proc.stdout!r} {proc.stderr!r}"
        )
    return Checked(out[0] == "accepted", out[1:])


# --------------------------------------------------------------------------------------------
# nginx.conf, read the way nginx would need it


def _strip_comments(text: str) -> str:
    """nginx.conf without comments: `#` outside quotes up to the end of the line."""
    out = []
    for line in text.splitlines():
        quote = None
        for i, ch in enumerate(line):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


@dataclasses.dataclass
class NginxConf:
    text: str

    @classmethod
    def load(cls, path: Path = NGINX_CONF) -> "NginxConf":
        return cls(path.read_text())

    @property
    def code(self) -> str:
        return _strip_comments(self.text)

    def plugin_config(self) -> str:
        (conf,) = re.findall(r"^\s*proxy_wasm matrix_sync_router '(.*)';", self.code, re.MULTILINE)
        return conf

    def shm_zones(self) -> list[str]:
        return re.findall(r"^\s*shm_kv (\S+) \S+;", self.code, re.MULTILINE)

    def set_variables(self) -> list[str]:
        return re.findall(r"^\s*set \$(\w+) \"\";", self.code, re.MULTILINE)

    def hash_variables(self) -> list[str]:
        return re.findall(r"^\s*hash \$(\w+) consistent;", self.code, re.MULTILINE)

    def header_variables(self, name: str) -> list[str]:
        return re.findall(
            rf"^\s*proxy_set_header {re.escape(name)} \$(\w+);", self.code, re.MULTILINE | re.I
        )

    def blocks(self, keyword: str) -> list[tuple[str, str]]:
        """(argument, body) of every `keyword ... { ... }` block (nested braces balanced)."""
        code = self.code
        found = []
        for m in re.finditer(rf"^\s*{keyword}\s+([^{{\n]*)\{{", code, re.MULTILINE):
            depth, i = 1, m.end()
            while depth:
                depth += {"{": 1, "}": -1}.get(code[i], 0)
                i += 1
            found.append((m[1].strip(), code[m.end() : i - 1]))
        return found

    def sync_location_regex(self) -> str:
        (arg,) = [a for a, body in self.blocks("location") if "proxy_wasm" in body]
        return arg.removeprefix("~").strip()
