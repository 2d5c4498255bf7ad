"""`just validate [FILE]`: checks an Envoy config (YAML) or an nginx.conf with the built filter in
place.

Envoy: the file is copied with the path of every matrix-sync-router module replaced by the built
filter, and run through `envoy --mode validate` (the pinned Envoy of .venv). Envoy 1.40's validate
mode starts the Wasm VM and runs the filter's configuration, but its last line only says "Unable
to create Wasm plugin", so the filter's own error line (the one naming the field) is printed
last. Each plugin configuration is also run through the filter's parser by the harness's
`check-config`, which names the field even where Envoy stops earlier for another reason.

nginx: `nginx -t` does not run a filter's configuration (a bad one only shows when the workers
start, and then they exit), so every `proxy_wasm NAME '<json>'` is run through `check-config`
with the `shm_kv` zones the file declares; `nginx -t` runs too when $NGINX_WASM_BIN names an
nginx built with ngx_wasm_module, and is reported as skipped otherwise.

Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from msrtest.env import DEFAULT_WASM, ENVOY_YAML, REPO
from msrtest.envoy import dicts_in
from msrtest.procs import venv_bin

FILTER = "matrix_sync_router"
WASM_FILTER = "envoy.filters.http.wasm"


class Report:
    """Collects the verdicts; the filter's own error lines are printed last."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False
        self.filter_errors: list[str] = []  # the filter's own lines, from check-config or Envoy

    def ok(self, text: str) -> None:
        print(f"ok:      {text}")

    def skip(self, text: str) -> None:
        print(f"skipped: {text}")

    def fail(self, text: str) -> None:
        self.failed = True
        print(f"FAILED:  {text}")

    def finish(self) -> int:
        if not self.failed:
            print(f"{self.path}: valid")
            return 0
        print(f"{self.path}: INVALID" + (", because:" if self.filter_errors else ""))
        for line in dict.fromkeys(self.filter_errors):  # last, whatever came before
            print(f"  {line}")
        return 1


PROXY_FIELD = {"envoy": "envoy", "ngx": "ngx_wasm_module"}


def check_config(
    args, report: Report, where: str, config: str, host: str, zones: list[str] | None = None
) -> None:
    """Runs one plugin configuration through the filter's parser (tests/harness check-config),
    and checks that its `proxy` field names the host it is for: the filter accepts either value
    anywhere, but the other host's behaviour fails at run time (a cluster name is no host:port)."""
    try:
        proxy = json.loads(config or "{}").get("proxy", "envoy")
    except (ValueError, AttributeError):
        proxy = None  # not a JSON object: check-config reports it
    if proxy is not None and proxy != PROXY_FIELD[host]:
        report.fail(
            f'{where}: "proxy" is {json.dumps(proxy)}, but this file is for '
            f'{"Envoy" if host == "envoy" else "nginx"}: set "proxy": "{PROXY_FIELD[host]}"'
        )
    argv = [str(args.check_config), "--host", host]
    if zones is not None:
        argv += ["--zones", ",".join(zones)]
    proc = subprocess.run(
        [*argv, str(args.wasm), config], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode == 0:
        report.ok(f"{where}: the filter accepts its configuration (check-config, {host} profile)")
        return
    report.fail(f"{where}: the filter refuses its configuration (check-config, {host} profile):")
    for line in lines[:-1]:  # the last one, the filter's error, is printed at the very end
        print(f"         {line}")
    if lines:
        report.filter_errors.append(lines[-1])


# --------------------------------------------------------------------------------------------
# Envoy


def wasm_filters(node) -> list[dict]:
    """Every `envoy.filters.http.wasm` filter anywhere in the configuration."""
    return [
        n
        for n in dicts_in(node)
        if n.get("name") == WASM_FILTER and isinstance(n.get("typed_config"), dict)
    ]


def is_ours(plugin: dict) -> bool:
    filename = plugin.get("vm_config", {}).get("code", {}).get("local", {}).get("filename", "")
    return FILTER in (plugin.get("root_id", ""), plugin.get("name", "")) or (
        Path(filename).name == f"{FILTER}.wasm"
    )


def plugin_configuration(plugin: dict) -> str | None:
    """The JSON text of the plugin configuration (a StringValue, as envoy.yaml has it)."""
    conf = plugin.get("configuration")
    if conf is None:
        return ""
    if isinstance(conf, dict) and isinstance(conf.get("value"), str):
        return conf["value"]
    return None


def cluster_names(cfg: dict) -> set[str]:
    return {c.get("name") for c in cfg.get("static_resources", {}).get("clusters", []) or []}


def validate_envoy(args, report: Report, path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    ours = [f["typed_config"].get("config", {}) for f in wasm_filters(cfg)]
    ours = [p for p in ours if is_ours(p)]
    if not ours:
        report.fail(f"{path}: no {WASM_FILTER} filter loading {FILTER}.wasm found")
    for i, plugin in enumerate(ours):
        where = f"{path}: wasm filter `{plugin.get('name', i)}`"
        local = plugin.setdefault("vm_config", {}).setdefault("code", {}).setdefault("local", {})
        print(f"using the built filter {args.wasm} in place of {local.get('filename')!r}")
        local["filename"] = str(args.wasm.resolve())
        text = plugin_configuration(plugin)
        if text is None:
            report.skip(f"{where}: configuration is not a StringValue; only Envoy checks it")
            continue
        check_config(args, report, where, text, "envoy")
        try:
            upstream = json.loads(text or "{}").get("whoami_upstream", "synapse_whoami")
        except (ValueError, AttributeError):
            continue  # check-config has reported it
        if upstream not in cluster_names(cfg) and "dynamic_resources" not in cfg:
            report.fail(
                f"{where}: whoami_upstream `{upstream}` names no cluster of this file "
                "(every whoami call would fail)"
            )
    with tempfile.TemporaryDirectory(prefix="msr-validate-") as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(yaml.safe_dump(cfg, sort_keys=False))
        envoy = venv_bin("envoy")
        proc = subprocess.run(
            [
                envoy,
                "--mode",
                "validate",
                "-c",
                str(copy),
                "--disable-hot-restart",
                "--log-level",
                "warning",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    log = (proc.stdout + proc.stderr).replace(str(copy), str(path))
    lines = [line for line in log.splitlines() if line.strip()]
    if proc.returncode == 0:
        report.ok(f"{path}: `envoy --mode validate` ({envoy}) accepts it")
        return
    report.fail(f"{path}: `envoy --mode validate` ({envoy}) refuses it:")
    for line in lines[-15:]:
        print(f"         {line}")
    # The filter's own line (e.g. "invalid configuration: field `cache_ttl_s`: ...").
    report.filter_errors += [
        m[1] for line in lines if (m := re.search(r"wasm log .*?: (matrix-sync-router: .*)", line))
    ]


# --------------------------------------------------------------------------------------------
# nginx


def nginx_tokens(text: str) -> list[str]:
    """nginx.conf split into words, `;`, `{` and `}` (quotes removed, escapes resolved, comments
    dropped): enough to find `module`, `shm_kv` and `proxy_wasm` directives."""
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c == "#":
            i = text.find("\n", i) if "\n" in text[i:] else n
        elif c in ";{}":
            tokens.append(c)
            i += 1
        elif c in "'\"":
            word, i = [], i + 1
            while i < n and text[i] != c:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                word.append(text[i])
                i += 1
            tokens.append("".join(word))
            i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in ";{}":
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def nginx_directives(text: str) -> list[list[str]]:
    """Each simple directive as its words (block names are skipped)."""
    directives, current = [], []
    for token in nginx_tokens(text):
        if token == ";":
            directives.append(current)
            current = []
        elif token in "{}":
            current = []
        else:
            current.append(token)
    return directives


def validate_nginx(args, report: Report, path: Path) -> None:
    text = path.read_text()
    directives = [d for d in nginx_directives(text) if d]
    modules = {d[1]: d[2] for d in directives if d[0] == "module" and len(d) == 3}
    zones = [d[1] for d in directives if d[0] == "shm_kv" and len(d) >= 3]
    plugins = [d for d in directives if d[0] == "proxy_wasm"]
    ours = [name for name, file in modules.items() if Path(file).name == f"{FILTER}.wasm"]
    if not plugins:
        report.fail(f"{path}: no proxy_wasm directive found")
    for d in plugins:
        name = d[1] if len(d) > 1 else ""
        where = f"{path}: proxy_wasm {name}"
        if name not in modules:
            report.fail(f"{where}: no `module {name} ...;` in the wasm {{}} block")
            continue
        if name not in ours:
            report.skip(f"{where}: module {modules[name]} is not {FILTER}.wasm")
            continue
        check_config(args, report, where, d[2] if len(d) > 2 else "", "ngx", zones)
    binary = os.environ.get("NGINX_WASM_BIN", "")
    if not binary:
        report.skip(
            "`nginx -t`: NGINX_WASM_BIN is not set (it must name an nginx built with "
            "ngx_wasm_module, which is in no package registry); only the plugin "
            "configurations were checked"
        )
        return
    with tempfile.TemporaryDirectory(prefix="msr-validate-") as tmp:
        copy = Path(tmp) / path.name
        for name in ours:
            text = re.sub(
                rf"(\bmodule\s+{name}\s+)\S+;", lambda m: f"{m[1]}{args.wasm.resolve()};", text
            )
        copy.write_text(f"pid {tmp}/nginx.pid;\n{text}")
        proc = subprocess.run(
            [binary, "-t", "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    out = (proc.stdout + proc.stderr).replace(str(copy), str(path)).strip()
    if proc.returncode == 0:
        report.ok(f"{path}: `{binary} -t` accepts it (it does not run the filter's configuration)")
    else:
        report.fail(f"{path}: `{binary} -t` refuses it:\n{out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, nargs="?", default=ENVOY_YAML)
    parser.add_argument("--wasm", type=Path, default=DEFAULT_WASM, help="the built filter")
    parser.add_argument(
        "--check-config",
        type=Path,
        default=REPO / "target" / "debug" / "check-config",
        help="the harness's check-config binary (`just check-config`)",
    )
    args = parser.parse_args(argv)
    for what, file in (("filter", args.wasm), ("check-config", args.check_config)):
        if not file.is_file():
            parser.error(f"{what} not built: {file} (run `just validate`, which builds both)")
    if not args.file.is_file():
        parser.error(f"no such file: {args.file}")
    report = Report(args.file)
    text = args.file.read_text()
    if args.file.suffix in (".yaml", ".yml", ".json") or "static_resources" in text:
        print(f"validating {args.file} as an Envoy configuration")
        validate_envoy(args, report, args.file)
    else:
        print(f"validating {args.file} as an nginx configuration (ngx_wasm_module)")
        validate_nginx(args, report, args.file)
    return report.finish()


if __name__ == "__main__":
    sys.exit(main())
