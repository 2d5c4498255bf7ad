"""Offline checks of the shipped proxy configurations (nginx-wasm/nginx.conf, nginx-wasm/kong/).

They run without nginx or Kong: the plugin configurations inside those files are handed to the
compiled filter's own configuration parser through the harness's `check-config` binary (the
real .wasm, its real on_configure, under the ngx_wasm_module host profile with the `shm_kv`
zones the file declares), and to Kong's validator, JSON Schema draft-4, with
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

from msrtest.env import REPO
from msrtest.procs import StackError

META_JSON = REPO / "nginx-wasm" / "matrix_sync_router.meta.json"
NGINX_CONF = REPO / "nginx-wasm" / "nginx.conf"
KONG_YML = REPO / "nginx-wasm" / "kong" / "kong.yml"
KONG_CONF = REPO / "nginx-wasm" / "kong" / "kong.conf"
CHECK_CONFIG = REPO / "target" / "debug" / "check-config"

# Paths on which a proxy's sync-route pattern must agree with the filter's default sync_paths.
SYNC_SAMPLES = [
    "/_matrix/client/v3/events",
    "/_matrix/client/r0/initialSync",
    "/_matrix/client/unstable/sync",
    "/_matrix/client/api/v1/rooms/!room:example.org/initialSync",
    "/_matrix/client/v3/sync",
    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
    "/_matrix/client/v4/sync",
]
NOT_SYNC_SAMPLES = [
    "/_matrix/client/v3/sync/",
    "/_matrix/client/v4/sync/",
    "/_matrix/client/v4/events",
    "/_matrix/client/v3/rooms/!room:example.org/messages",
    "/_matrix/client/v3/rooms/a/b/initialSync",
    "/_matrix/client/unstable/org_matrix_simplified_msc3575/sync",
    "/prefix/_matrix/client/v3/sync",
    "/_matrix/client/v3/login",
    "/_matrix/federation/v1/send/1",
]


# The same for a room-endpoint pattern and the filter's default room_paths.
ROOM_SAMPLES = [
    "/_matrix/client/v3/rooms/!room:example.org/messages",
    "/_matrix/client/r0/rooms/!room:example.org/send/m.room.message/txn1",
    "/_matrix/client/api/v1/rooms/!room:example.org/state",
    "/_matrix/client/unstable/rooms/!room:example.org/state/m.room.name/",
    "/_matrix/client/v3/rooms/!room:example.org/receipt/m.read/$event",
    "/_matrix/client/v1/rooms/!room:example.org/hierarchy",
    "/_matrix/client/v1/rooms/!room:example.org/relations/$event/m.thread",
    "/_matrix/client/v3/rooms/%23alias:example.org/members",
]
NOT_ROOM_SAMPLES = [
    "/_matrix/client/v3/rooms/!room:example.org/initialSync",
    "/_matrix/client/v3/rooms/!room:example.org/join",
    "/_matrix/client/v3/rooms/!room:example.org/messagesx",
    "/_matrix/client/v1/rooms/!room:example.org/messages",
    "/_matrix/client/v3/rooms/!room:example.org/hierarchy",
    "/_matrix/client/v3/rooms//messages",
    "/_matrix/client/v3/sync",
    "/prefix/_matrix/client/v3/rooms/!room:example.org/messages",
]


def config_schema() -> dict:
    return json.loads(META_JSON.read_text())["config_schema"]


def schema_errors(config) -> list[str]:
    """What Kong's draft-4 validation of a filter config against config_schema reports."""
    validator = jsonschema.Draft4Validator(config_schema())
    return [
        f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def template_regex(template: str) -> str:
    """A sync_paths template (src/paths.rs: `*` one segment, a last `/**` anything, `{a|b}`
    literal alternatives, the rest literal, the whole path) as an equivalent regex."""
    out, i = "", 0
    while i < len(template):
        if template.startswith("/**", i) and i + 3 == len(template):
            out += "(/.*)?"
            i += 3
        elif template[i] == "*":
            out += "[^/]+"
            i += 1
        elif template[i] == "{":
            end = template.index("}", i)
            out += "(" + "|".join(re.escape(a) for a in template[i + 1 : end].split("|")) + ")"
            i = end + 1
        else:
            out += re.escape(template[i])
            i += 1
    return f"^{out}$"


def matches(regexes: list[str], path: str) -> bool:
    return any(re.search(r, path) for r in regexes)


def same_family_as_the_filter(regexes: list[str], field: str = "sync_paths") -> list[str]:
    """Sample paths on which a proxy's route `regexes` and the filter's default `field`
    templates (sync_paths, or room_paths) disagree."""
    defaults = [template_regex(t) for t in config_schema()["properties"][field]["default"]]
    samples = {
        "sync_paths": SYNC_SAMPLES + NOT_SYNC_SAMPLES,
        "room_paths": ROOM_SAMPLES + NOT_ROOM_SAMPLES,
    }[field]
    return [p for p in samples if matches(regexes, p) != matches(defaults, p)]


# --------------------------------------------------------------------------------------------
# the filter's own parser, through the harness


@dataclasses.dataclass
class Checked:
    accepted: bool
    output: list[str]


@functools.lru_cache(maxsize=1)
def check_config_bin() -> Path:
    """The harness's check-config binary (`just check-config`; `just harness` builds it too)."""
    subprocess.run(
        ["cargo", "build", "-q", "-p", "proxy-wasm-harness", "--bin", "check-config"],
        cwd=REPO,
        check=True,
        timeout=1800,
    )
    return CHECK_CONFIG


def filter_configure(wasm: Path, config: str, *, host: str = "ngx", zones=None) -> Checked:
    """Starts the compiled filter in the harness and configures it with `config`, as the host
    would at start-up (for ngx, with exactly the `shm_kv` zones given)."""
    argv = [str(check_config_bin()), "--host", host]
    if zones is not None:
        argv += ["--zones", ",".join(zones)]
    proc = subprocess.run(
        [*argv, str(Path(wasm).resolve()), "-"],
        input=config,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode not in (0, 1, 2):
        raise StackError(f"check-config failed ({proc.returncode}): {proc.stderr}")
    return Checked(proc.returncode == 0, (proc.stdout + proc.stderr).splitlines())


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
    def load(cls, path: Path = NGINX_CONF) -> NginxConf:
        return cls(path.read_text())

    @property
    def code(self) -> str:
        return _strip_comments(self.text)

    def plugin_configs(self) -> list[str]:
        """The JSON of every `proxy_wasm matrix_sync_router '...'` line, in file order."""
        return re.findall(r"^\s*proxy_wasm matrix_sync_router '(.*)';", self.code, re.MULTILINE)

    def plugin_config(self) -> str:
        """The filter's configuration: every location that runs the filter has the same one."""
        (conf,) = set(self.plugin_configs())
        return conf

    def shm_zones(self) -> list[str]:
        return re.findall(r"^\s*shm_kv (\S+) \S+;", self.code, re.MULTILINE)

    def set_variables(self) -> list[str]:
        return re.findall(r"^\s*set \$(\w+) \"\";", self.code, re.MULTILINE)

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

    def filter_location(self, proxy_pass: str) -> tuple[str, str]:
        """(regex, body) of the one location that runs the filter and proxies to `proxy_pass`."""
        (found,) = [
            (a.removeprefix("~").strip(), body)
            for a, body in self.blocks("location")
            if "proxy_wasm" in body
            and re.search(rf"^\s*proxy_pass {re.escape(proxy_pass)};", body, re.MULTILINE)
        ]
        return found

    def sync_location_regex(self) -> str:
        return self.filter_location("http://$msr_sync_pool")[0]

    def room_location_regex(self) -> str:
        return self.filter_location("http://synapse_room_workers")[0]

    def maps(self) -> dict[str, tuple[str, dict[str, str]]]:
        """Every `map $source $name { key value; ... }`: name → (source, {key: value})."""
        found = {}
        for m in re.finditer(r"^\s*map \$(\w+) \$(\w+) \{([^}]*)\}", self.code, re.MULTILINE):
            entries = re.findall(r'^\s*("[^"]*"|\S+)\s+(\S+);', m[3], re.MULTILINE)
            found[m[2]] = (m[1], {k.strip('"'): v for k, v in entries})
        return found
