"""Envoy: the repository's envoy.yaml rendered with only addresses, ports, the .wasm path, the
access log path and (optionally) plugin configuration fields substituted; the Envoy process with its
admin helpers; its access log (which worker served a request: `upstream_host`, correlated by the
`x-request-id` Envoy echoes in every response); and the helpers of the fault, restart and remap
tests (`tune_health_checks`, `HotRestartEnvoy`, `Envoy.use_worker_ports`)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from msrtest.env import ENVOY_YAML, HOST, free_ports
from msrtest.httpclient import Response, http_request
from msrtest.matrix import SYNC_PATH, Device
from msrtest.procs import Service, StackError, process_rss_kib, venv_bin, wait_until
from msrtest.synapse import Synapse

if TYPE_CHECKING:
    from msrtest.stack import Stack


# --------------------------------------------------------------------------------------------
# Envoy configuration: the repository's envoy.yaml with only addresses/ports/paths substituted


def dicts_in(node) -> Iterator[dict]:
    """Every mapping anywhere in a parsed configuration (an Envoy config or /config_dump),
    parents before their children."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from dicts_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from dicts_in(value)


def uncomment_block(text: str, block: str) -> tuple[str, list[str]]:
    """`text` (envoy.yaml) with its commented-out block between `# {block}: begin` and
    `# {block}: end` turned on as an operator would (one `# ` removed from each line, indentation
    kept), and the block's own lines so uncommented. The block as shipped is what a test runs."""
    out, own, inside = [], [], False
    for line in text.splitlines():
        if line.strip() == f"# {block}: begin":
            inside = True
        elif line.strip() == f"# {block}: end":
            inside = False
        elif inside:
            indent = len(line) - len(line.lstrip())
            if not line.lstrip().startswith("# "):
                raise StackError(f"envoy.yaml: {block} block, line not commented: {line}")
            line = line[:indent] + line.lstrip()[2:]
            own.append(line)
        out.append(line)
    if not own:
        raise StackError(f"envoy.yaml: no commented-out {block} block")
    return "\n".join(out) + "\n", own


def _socket_address(port: int) -> dict:
    return {"address": {"socket_address": {"address": HOST, "port_value": port}}}


def _find_one(items: list, what: str, **match) -> dict:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise StackError(
            f"envoy.yaml: expected exactly one {what} with {match}, found {len(found)}"
        )
    return found[0]


def render_envoy_config(
    *,
    listener_port: int,
    admin_port: int,
    main_port: int,
    worker_ports: list[int],
    whoami_port: int,
    wasm: Path,
    access_log: Path,
    plugin_overrides: dict | None = None,
    optional_clusters: dict[str, list[int]] | None = None,
    source: Path = ENVOY_YAML,
    initial_sync_ports: list[int] | None = None,
    room_ports: list[int] | None = None,
) -> dict:
    """envoy.yaml with addresses, ports and paths substituted. The initial-sync pool is empty
    unless `initial_sync_ports` is given (initial syncs then go to the sync workers, as with an
    operator who runs no such pool); room workers default to the sync workers' listeners.
    `optional_clusters` gives the endpoints of clusters envoy.yaml may or may not define: one
    that is present gets those endpoints (over the defaults above), one that is absent is left
    out."""
    cfg = yaml.safe_load(source.read_text())
    cfg["admin"]["address"]["socket_address"] = {"address": HOST, "port_value": admin_port}

    listener = _find_one(cfg["static_resources"]["listeners"], "listener", name="matrix_client")
    listener["address"]["socket_address"] = {"address": HOST, "port_value": listener_port}
    hcms = [
        f["typed_config"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    if len(hcms) != 1:
        raise StackError("envoy.yaml: expected one http_connection_manager")
    hcm = hcms[0]
    for log in hcm["access_log"]:
        log["typed_config"]["path"] = str(access_log)

    wasm_filter = _find_one(hcm["http_filters"], "http filter", name="envoy.filters.http.wasm")
    plugin = wasm_filter["typed_config"]["config"]
    plugin["vm_config"]["code"]["local"]["filename"] = str(wasm)
    if plugin_overrides:
        conf = json.loads(plugin["configuration"]["value"])
        conf.update(plugin_overrides)
        plugin["configuration"]["value"] = json.dumps(conf)

    clusters = cfg["static_resources"]["clusters"]
    for name, ports in (
        ("synapse_sync_workers", worker_ports),
        ("synapse_initial_sync_workers", initial_sync_ports or []),
        ("synapse_room_workers", worker_ports if room_ports is None else room_ports),
        ("synapse_main", [main_port]),
        ("synapse_whoami", [whoami_port]),
    ):
        _set_endpoints(_find_one(clusters, "cluster", name=name), ports)
    for name, ports in (optional_clusters or {}).items():
        present = [c for c in clusters if c.get("name") == name]
        if present:
            _set_endpoints(_find_one(present, "cluster", name=name), ports)
    return cfg


def _set_endpoints(cluster: dict, ports: list[int]) -> None:
    cluster["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": _socket_address(p)} for p in ports]}
    ]


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


# --------------------------------------------------------------------------------------------
# Envoy


class Envoy(Service):
    """An Envoy running the substituted envoy.yaml in front of `synapse`."""

    # Hot-restart flags; HotRestartEnvoy replaces them with --base-id/--restart-epoch.
    restart_args: tuple[str, ...] = ("--disable-hot-restart",)

    def __init__(
        self,
        workdir: Path,
        name: str,
        synapse: Synapse,
        wasm: Path,
        plugin_overrides: dict | None = None,
        whoami_port: int | None = None,
        initial_sync_ports: list[int] | None = None,
        room_ports: list[int] | None = None,
        sync_ports: list[int] | None = None,
        optional_clusters: dict[str, list[int]] | None = None,
        log_args: Iterable[str] = ("--log-level", "info"),
        source: Path = ENVOY_YAML,
    ):
        """`sync_ports`: the sync workers' client listeners when they are not `synapse`'s own
        extra listeners (real generic_workers); `optional_clusters`: see render_envoy_config;
        `source`: the Envoy configuration file (a test's edited copy of envoy.yaml)."""
        wasm = Path(wasm).resolve()
        self.log_args = list(log_args)  # e.g. ("--log-level", "trace") to see every log line
        if not wasm.is_file():
            raise StackError(f"filter not built: {wasm} is missing (run `just build`)")
        self.dir = workdir
        self.name = name
        self.synapse = synapse
        self.port, self.admin_port = free_ports(2)
        self.access_log = workdir / f"{name}.access.log"
        self.config_path = workdir / f"{name}.envoy.yaml"
        sync_ports = synapse.worker_ports if sync_ports is None else sync_ports
        self.cfg = render_envoy_config(
            listener_port=self.port,
            admin_port=self.admin_port,
            main_port=synapse.main_port,
            worker_ports=sync_ports,
            whoami_port=synapse.main_port if whoami_port is None else whoami_port,
            wasm=wasm,
            access_log=self.access_log,
            plugin_overrides=plugin_overrides,
            initial_sync_ports=initial_sync_ports,
            room_ports=room_ports,
            optional_clusters=optional_clusters,
            source=source,
        )
        self._log_offset = 0
        self._log_partial = b""
        self._entries: dict[str, dict] = {}
        # upstream host "127.0.0.1:port" → worker name
        self.sync_ports = sync_ports
        self.workers = {f"{HOST}:{p}": f"sync-{i + 1}" for i, p in enumerate(sync_ports)}
        for i, p in enumerate(synapse.worker_ports):
            self.workers.setdefault(f"{HOST}:{p}", f"sync-{i + 1}")
        for i, p in enumerate(initial_sync_ports or []):
            self.workers.setdefault(f"{HOST}:{p}", f"initial-{i + 1}")

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.envoy.log"

    def start(self, timeout: float = 60.0) -> Envoy:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.dump(self.cfg, Dumper=_NoAliasDumper, sort_keys=False))
        self.access_log.touch()
        self.spawn(
            f"envoy {self.name}",
            [
                venv_bin("envoy"),
                "-c",
                str(self.config_path),
                "--concurrency",
                "2",
                *self.restart_args,
                "--file-flush-interval-msec",
                "20",
                *self.log_args,
            ],
            log=self.log,
            cwd=self.dir,
        )
        self.wait_for(
            lambda: http_request(self.admin_port, "GET", "/ready", timeout=2).status == 200,
            timeout,
            f"Envoy {self.name} /ready",
        )
        # Every sync worker healthy (first health checks done), so spreading is not skewed.
        try:
            self.wait_for(
                lambda: len(self.healthy_hosts("synapse_sync_workers")) == len(self.sync_ports),
                timeout,
                f"Envoy {self.name}: all sync workers healthy",
            )
        except StackError as exc:
            raise StackError(f"{exc}; Envoy's view: {self._health_report()}") from None
        return self

    def _health_report(self) -> str:
        """Each sync worker's health flags and health-check stats, for a start-up that failed."""
        try:
            data = self.admin("/clusters?format=json").json()
            stats = self.stats()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            return f"(admin unreachable: {exc})"
        hosts = [
            f"{h['address']['socket_address']['port_value']}: {h.get('health_status')}"
            for c in data.get("cluster_statuses", [])
            if c.get("name") == "synapse_sync_workers"
            for h in c.get("host_statuses", [])
        ]
        prefix = "cluster.synapse_sync_workers.health_check."
        hc = {k[len(prefix) :]: v for k, v in stats.items() if k.startswith(prefix)}
        return f"hosts {hosts}; {hc}"

    # --- admin -------------------------------------------------------------------------------

    def admin(self, path: str) -> Response:
        return http_request(self.admin_port, "GET", path, timeout=10)

    def healthy_hosts(self, cluster: str) -> list[str]:
        data = self.admin("/clusters?format=json").json()
        hosts = []
        for c in data.get("cluster_statuses", []):
            if c.get("name") != cluster:
                continue
            for h in c.get("host_statuses", []):
                hs = h.get("health_status", {})
                failed = any(k.startswith("failed") and v for k, v in hs.items())
                if not failed and hs.get("eds_health_status", "HEALTHY") == "HEALTHY":
                    sa = h["address"]["socket_address"]
                    hosts.append(f"{sa['address']}:{sa['port_value']}")
        return hosts

    def stats(self) -> dict[str, int]:
        """Counters and gauges from /stats?format=json, by name."""
        data = self.admin("/stats?format=json").json()
        return {s["name"]: s["value"] for s in data["stats"] if "value" in s}

    def prometheus(self) -> dict[str, float]:
        """/stats/prometheus as {metric name: value} (labels dropped, values summed)."""
        values: dict[str, float] = {}
        for line in self.admin("/stats/prometheus").body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
        return values

    # --- client side -------------------------------------------------------------------------

    def request(self, method: str, path: str, *args, **kwargs) -> Response:
        """http_request() to Envoy's listener."""
        return http_request(self.port, method, path, *args, **kwargs)

    def sync(
        self,
        token: str | None,
        *,
        via: str = "header",
        scheme: str = "Bearer",
        extra_headers: Iterable[tuple[str, str]] = (),
        path: str = SYNC_PATH,
        query: dict | None = None,
    ) -> Response:
        """GET /sync?timeout=0 through Envoy; the token in the Authorization header (`via`
        "header", with `scheme`) or percent-encoded char by char in `access_token` ("query")."""
        params = dict(query or {"timeout": "0"})
        headers = list(extra_headers)
        qs = urllib.parse.urlencode(params)
        if token is not None and via == "header":
            headers.append(("Authorization", f"{scheme} {token}"))
        elif token is not None and via == "query":
            encoded = "".join(f"%{b:02X}" for b in token.encode())
            qs = f"{qs}&access_token={encoded}" if qs else f"access_token={encoded}"
        elif token is not None:
            raise ValueError(f"via must be 'header' or 'query', not {via!r}")
        return self.request("GET", f"{path}?{qs}" if qs else path, headers)

    def login(self, user_id: str, password: str, device_name: str) -> Device:
        """Password login through Envoy: a new access token and device."""
        body = json.dumps(
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": user_id},
                "password": password,
                "initial_device_display_name": device_name,
            }
        ).encode()
        r = self.request(
            "POST", "/_matrix/client/v3/login", [("Content-Type", "application/json")], body
        )
        if r.status != 200:
            raise StackError(
                f"login of {user_id} through Envoy failed: {r.status} {r.body[:300]!r}"
            )
        data = r.json()
        return Device(data["user_id"], data["device_id"], data["access_token"])

    # --- access log --------------------------------------------------------------------------

    def _read_access_log(self) -> None:
        with self.access_log.open("rb") as f:
            f.seek(self._log_offset)
            chunk = f.read()
        self._log_offset += len(chunk)
        data = self._log_partial + chunk
        *lines, self._log_partial = data.split(b"\n")
        for line in lines:
            if line.strip():
                entry = json.loads(line)
                self._entries[entry.get("request_id") or f"-{len(self._entries)}"] = entry

    def log_entry(self, request_id: str, timeout: float = 10.0) -> dict:
        """The access log entry of one request (waits for Envoy to flush it)."""
        if not request_id:
            raise StackError("response carried no x-request-id")

        def find():
            self._read_access_log()
            return self._entries.get(request_id)

        return wait_until(find, timeout, f"access log entry {request_id}", interval=0.02)

    def log_entries(self) -> list[dict]:
        self._read_access_log()
        return list(self._entries.values())

    def worker_of(self, response: Response) -> str:
        """Name of the sync worker ("sync-N") that served a response, from the access log."""
        host = self.log_entry(response.request_id).get("upstream_host")
        if host not in self.workers:
            raise StackError(
                f"request {response.request_id} was not served by a sync worker: {host}"
            )
        return self.workers[host]

    def entries_by_user_agent(self) -> dict[str, dict]:
        """Access log entries keyed by User-Agent: the load generator (msrtest.load) gives every
        request its own, so requests that never got an answer (no x-request-id) are found too."""
        return {e["user_agent"]: e for e in self.log_entries() if e.get("user_agent")}

    # --- process -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid

    def rss_kib(self) -> int:
        """Resident memory of the Envoy process (VmRSS from /proc), in KiB."""
        return process_rss_kib(self.pid)

    def use_worker_ports(self, ports: list[int]) -> None:
        """Before start(): send the sync worker cluster to `ports` instead of Synapse's own
        listeners (e.g. a relay the test can break); worker names stay sync-1..N by position."""
        set_cluster_ports(self.cfg, "synapse_sync_workers", ports)
        self.workers = {f"{HOST}:{p}": f"sync-{i + 1}" for i, p in enumerate(ports)}


# --------------------------------------------------------------------------------------------
# faults, restarts, load: helpers for test_faults, test_synapse_down, test_hot_restart,
# test_remap and test_soak


def set_cluster_ports(cfg: dict, cluster: str, ports: list[int]) -> None:
    """Point one cluster of a rendered config at 127.0.0.1:`ports`."""
    c = cluster_config(cfg, cluster)
    c["load_assignment"]["endpoints"] = [
        {"lb_endpoints": [{"endpoint": _socket_address(p)} for p in ports]}
    ]


def tune_health_checks(
    cfg: dict, cluster: str, interval_s: float = 0.5, unhealthy: int = 2, healthy: int = 1
) -> None:
    """Run envoy.yaml's own active health check of `cluster` faster (every `interval_s`, also
    before any traffic), so a test sees a host leave and rejoin the ring within seconds. The
    check itself (HTTP GET /health, its timeout) is the operator's; only its pace changes."""
    c = cluster_config(cfg, cluster)
    if len(c.get("health_checks", [])) != 1:
        raise StackError(f"envoy.yaml: expected one health check on {cluster}")
    hc = c["health_checks"][0]
    interval = f"{interval_s}s"
    hc.update(
        interval=interval,
        no_traffic_interval=interval,
        unhealthy_interval=interval,
        interval_jitter="0s",
        unhealthy_threshold=unhealthy,
        healthy_threshold=healthy,
        timeout="1s",
    )


class HotRestartEnvoy(Envoy):
    """An Envoy started for hot restart (`--base-id`, `--restart-epoch`) instead of with
    --disable-hot-restart. `next_epoch()` makes the process that takes over its listener
    (same ports, same base id), possibly with another plugin configuration; the old process
    drains for `drain_s` and exits by itself after `parent_shutdown_s`."""

    drain_s = 2
    parent_shutdown_s = 5

    def __init__(self, *args, epoch: int = 0, base_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch = epoch
        self.base_id = base_id
        self.base_id_path = self.dir / f"{self.name}.base-id"

    @property
    def restart_args(self) -> tuple[str, ...]:  # type: ignore[override]
        base = (
            ("--use-dynamic-base-id", "--base-id-path", str(self.base_id_path))
            if self.base_id is None
            else ("--base-id", str(self.base_id))
        )
        return (
            *base,
            "--restart-epoch",
            str(self.epoch),
            "--drain-time-s",
            str(self.drain_s),
            "--parent-shutdown-time-s",
            str(self.parent_shutdown_s),
        )

    def start(self, timeout: float = 60.0) -> HotRestartEnvoy:
        super().start(timeout)
        # /ready may still be the parent's answer: wait until the admin port is this epoch's.
        self.wait_for(
            lambda: (
                self.admin("/server_info").json()["command_line_options"]["restart_epoch"]
                == self.epoch
            ),
            timeout,
            f"Envoy {self.name} (epoch {self.epoch}) serving its admin port",
        )
        if self.base_id is None:
            self.base_id = int(self.base_id_path.read_text().strip())
        return self

    def next_epoch(self, stack: Stack, plugin_overrides: dict | None = None) -> HotRestartEnvoy:
        """Hot-restart: a new Envoy process (epoch + 1) on the same ports; started."""
        child = stack.prepare_envoy(
            f"{self.name}-epoch{self.epoch + 1}",
            cls=HotRestartEnvoy,
            plugin_overrides=plugin_overrides,
            epoch=self.epoch + 1,
            base_id=self.base_id,
        )
        assert isinstance(child, HotRestartEnvoy)
        child.take_ports_of(self)
        return child.start()

    def take_ports_of(self, other: Envoy) -> None:
        """Listen (and serve admin) where `other` does, with the same sync worker endpoints."""
        self.port, self.admin_port = other.port, other.admin_port
        self.cfg["admin"]["address"]["socket_address"]["port_value"] = other.admin_port
        listener = _find_one(
            self.cfg["static_resources"]["listeners"], "listener", name="matrix_client"
        )
        listener["address"]["socket_address"]["port_value"] = other.port
        workers = other.cfg["static_resources"]["clusters"]
        for name in ("synapse_sync_workers", "synapse_whoami"):
            mine = _find_one(self.cfg["static_resources"]["clusters"], "cluster", name=name)
            mine["load_assignment"] = _find_one(workers, "cluster", name=name)["load_assignment"]
        self.workers = dict(other.workers)


def cluster_config(cfg: dict, cluster: str) -> dict:
    """The (mutable) definition of one cluster in a rendered config."""
    return _find_one(cfg["static_resources"]["clusters"], "cluster", name=cluster)
