"""Real Synapse + real Envoy (with the real filter) on 127.0.0.1, for the e2e tests and the demo.

One Synapse process (SQLite, under .e2e/) serves its main listener plus several extra `client`
listeners that play the sync workers, so every routed sync gets a real Synapse answer. It has one
application service registered (`Synapse.appservice`), and its "Processed request" log lines
(listener port, recorded client address, requester, path, user agent) are read with
`Synapse.processed_requests`. Envoy runs the repository's own envoy.yaml; `render_envoy_config`
only substitutes addresses, ports, the .wasm path, the access log path and (optionally) plugin
configuration fields. The helpers at the end (`tune_health_checks`, `HotRestartEnvoy`,
`Envoy.use_worker_ports`) are for the fault, restart and remap tests, which say what they change.

Which worker served a request is read from Envoy's access log (`upstream_host`), correlated by
the `x-request-id` Envoy echoes in every response (`always_set_request_id_in_response`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

import yaml

REPO = Path(__file__).resolve().parents[2]
E2E_DIR = REPO / ".e2e"
ENVOY_YAML = REPO / "envoy.yaml"
DEFAULT_WASM = REPO / "target" / "wasm32-wasip1" / "release" / "matrix_sync_router.wasm"
SERVER_NAME = "example.test"
HOST = "127.0.0.1"

SYNC_PATH = "/_matrix/client/v3/sync"
WHOAMI_PATH = "/_matrix/client/v3/account/whoami"  # the filter's default whoami_path
SLIDING_SYNC_PATH = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
# The hash key the filter sets when it routes without a user: `~` and 16 hex digits.
FALLBACK_KEY = re.compile(r"^~[0-9a-f]{16}$")


class StackError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# small helpers


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def venv_bin(name: str) -> str:
    """A console script of the interpreter's own environment (the pinned .venv), else PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} not found next to {sys.executable} nor on PATH (run `just venv`)")
    return found


def just_executable() -> str | None:
    """The `just` running this session (`just e2e` passes it as $MSR_JUST), else one on PATH."""
    return os.environ.get("MSR_JUST") or shutil.which("just")


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers.get("x-request-id", "")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes | None = None,
    timeout: float = 60.0,
) -> Response:
    """One request on a fresh connection; header names are sent exactly as given."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{HOST}:{port}")
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        merged: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        return Response(resp.status, merged, data)
    finally:
        conn.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1, check=None):
    """Poll predicate() until it returns a truthy value; check() may raise to abort early."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException, ValueError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise StackError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc})")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# process lifecycle: no exit path (Ctrl-C once or many times, SIGTERM, SIGHUP, an exception, the
# parent being killed) leaves a process, a port or a work directory behind

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Runs in the child between fork and exec: the kernel sends it SIGTERM when the parent dies,
    even by SIGKILL (PR_SET_PDEATHSIG survives exec). SIGTERM rather than SIGKILL so that a
    child with children of its own (an nginx master) stops them. If the parent is already gone,
    the child exits at once."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def signals_deferred():
    """Holds SIGINT, SIGTERM and SIGHUP while the block runs, then delivers them.

    Why: a signal landing inside a start (after the fork, before the child is recorded) or a
    shutdown (inside `proc.wait()`) abandons a child: a second Ctrl-C used to leave Synapse
    running. Signals reach only the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stop_on_termination() -> None:
    """SIGTERM and SIGHUP (where nobody handles them yet) raise KeyboardInterrupt like Ctrl-C, so
    pytest, the demo and any script using a Stack clean up on them too, instead of dying on the
    spot (their children would then be stopped only by the parent-death signal, and the work
    directory left behind)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _raise_interrupt)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live owner from a reused PID), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def processes_under(folder: Path) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose working directory is `folder` or below it (the
    stack starts each child in its run's folder)."""
    folder = folder.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            found.append((int(entry.name), cmdline.strip()))
    return found


def remove_stale_runs(e2e_dir: Path = E2E_DIR) -> list[Path]:
    """Removes the run folders under .e2e whose owner process is gone (it was killed, so it
    could not clean up), after killing anything still running in them. Folders kept on purpose
    (failed runs, $MSR_E2E_KEEP) have no owner file and stay."""
    removed = []
    for owner in e2e_dir.glob("*/owner"):
        try:
            pid, started = owner.read_text().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid)) == started:
            continue  # still running
        for stray, _ in processes_under(owner.parent):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stray, signal.SIGKILL)
        shutil.rmtree(owner.parent, ignore_errors=True)
        removed.append(owner.parent)
    return removed


class Process:
    """A child process in its own session (a terminal's Ctrl-C reaches only its parent, which
    stops it in order), killed with its whole group on stop(), and sent SIGTERM by the kernel if
    the parent dies first. stop() may be called any number of times."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, env: dict | None = None):
        self.name = name
        self.log = log
        self._log_file = open(log, "ab")
        parent = os.getpid()
        with signals_deferred():
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _die_with(parent),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise StackError(f"{self.name} exited with {code}; last log lines:\n{tail(self.log)}")

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the group, SIGKILL after `timeout` s; signals are held until it is done."""
        with signals_deferred():
            if self.proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(timeout)
            self._signal_group(signal.SIGKILL)  # anything the leader left in its group
            self._log_file.close()


class Service:
    """Something that runs as one child Process."""

    process: Process | None = None

    def spawn(self, name: str, argv: list[str], log: Path, cwd: Path) -> None:
        """Starts the child and records it in one step no signal can split."""
        with signals_deferred():
            self.process = Process(name, argv, log, cwd)

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.1):
        assert self.process is not None
        return wait_until(predicate, timeout, what, interval, check=self.process.check_alive)

    def stop(self) -> None:
        with signals_deferred():
            if self.process:
                self.process.stop()
                self.process = None


# --------------------------------------------------------------------------------------------
# Synapse


@dataclasses.dataclass
class Device:
    user_id: str
    device_id: str
    token: str = dataclasses.field(repr=False)  # never printed

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]


@dataclasses.dataclass
class AppService:
    """The application service registered in the test Synapse (no URL: it receives nothing)."""

    id: str
    sender_localpart: str
    user_prefix: str  # exclusive user namespace: @<user_prefix>.*:SERVER_NAME
    as_token: str = dataclasses.field(repr=False)  # never printed
    hs_token: str = dataclasses.field(repr=False)

    @property
    def sender(self) -> str:
        return f"@{self.sender_localpart}:{SERVER_NAME}"

    def registration(self) -> dict:
        """The registration file's content (Synapse `app_service_config_files`)."""
        return {
            "id": self.id,
            "url": None,
            "as_token": self.as_token,
            "hs_token": self.hs_token,
            "sender_localpart": self.sender_localpart,
            "namespaces": {
                "users": [
                    {
                        "exclusive": True,
                        "regex": f"@{re.escape(self.user_prefix)}.*:{re.escape(SERVER_NAME)}",
                    }
                ],
                "aliases": [],
                "rooms": [],
            },
        }


@dataclasses.dataclass
class ProcessedRequest:
    """One "Processed request" line of Synapse's access log (synapse.access.http.<port>)."""

    port: int  # the listener that served it
    client: str  # the client address Synapse recorded (first X-Forwarded-For entry if any)
    # "@user:server" (for an appservice masquerading: the masqueraded user), "<admin>|<user>"
    # when an admin puppets a user, "None" when unauthenticated
    requester: str
    status: str
    method: str
    path: str  # without the query string
    query: str  # as Synapse logs it (access_token redacted)
    user_agent: str


_PROCESSED_REQUEST = re.compile(
    r" synapse\.access\.https?\.(?P<port>\d+) (?P<client>\S+) - \S+ - \{(?P<requester>[^}]*)\}"
    r" Processed request: .* (?P<status>\d+!?) \"(?P<method>\S+) (?P<uri>\S+) [^\"]*\""
    r" \"(?P<ua>.*)\" \[\d+ dbevts\]$"
)


def write_log_config(path: Path, log: Path) -> None:
    """A Python logging config for one Synapse process: INFO to `log`, including the
    synapse.access "Processed request" lines that read_processed_requests() parses."""
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "formatters": {"f": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
                "handlers": {
                    "file": {"class": "logging.FileHandler", "formatter": "f", "filename": str(log)}
                },
                "root": {"level": "INFO", "handlers": ["file"]},
                "loggers": {"synapse.access": {"level": "INFO"}},
                "disable_existing_loggers": False,
            }
        )
    )


def read_processed_requests(log: Path, user_agent: str | None = None) -> list[ProcessedRequest]:
    """The "Processed request" lines of one Synapse process's log (only those with
    `user_agent`, if given); a missing log reads as no requests yet."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        m = _PROCESSED_REQUEST.search(line)
        if not m or (user_agent is not None and m["ua"] != user_agent):
            continue
        path, _, query = m["uri"].partition("?")
        found.append(
            ProcessedRequest(
                int(m["port"]), m["client"], m["requester"], m["status"], m["method"],
                path, query, m["ua"],
            )
        )
    return found


class Synapse(Service):
    """One Synapse process: a main listener and `n_workers` extra client listeners (0 when real
    generic_workers play the sync workers: workers.py)."""

    def __init__(self, workdir: Path, n_workers: int = 3):
        if n_workers < 0:
            raise ValueError("n_workers must be >= 0")
        self.dir = workdir
        self.main_port, *self.worker_ports = free_ports(1 + n_workers)
        self.shared_secret = secrets.token_hex(16)
        self.passwords: dict[str, str] = {}
        self.appservice = AppService(
            id="e2e-bridge",
            sender_localpart="e2e_bridge_bot",
            user_prefix="bridge_",
            as_token=secrets.token_urlsafe(24),
            hs_token=secrets.token_urlsafe(24),
        )

    @property
    def log(self) -> Path:
        return self.dir / "synapse.log"

    @property
    def appservice_file(self) -> Path:
        return self.dir / "appservice.yaml"

    def _config(self) -> dict:
        d = self.dir
        lenient = {"per_second": 1000, "burst_count": 1000}

        def listener(port: int) -> dict:
            return {
                "port": port,
                "bind_addresses": [HOST],
                "type": "http",
                "tls": False,
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }

        return {
            "server_name": SERVER_NAME,
            "pid_file": str(d / "homeserver.pid"),
            "listeners": [listener(self.main_port)] + [listener(p) for p in self.worker_ports],
            "database": {"name": "sqlite3", "args": {"database": str(d / "homeserver.db")}},
            "log_config": str(d / "log.yaml"),
            "app_service_config_files": [str(self.appservice_file)],
            "media_store_path": str(d / "media"),
            "signing_key_path": str(d / "signing.key"),
            "registration_shared_secret": self.shared_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "report_stats": False,
            "enable_registration": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            "max_upload_size": "200M",
            "bcrypt_rounds": 4,  # fast password logins (test users only)
            "rc_message": lenient,
            "rc_room_creation": lenient,
            "rc_registration": lenient,
            "rc_login": {"address": lenient, "account": lenient, "failed_attempts": lenient},
            "rc_joins": {"local": lenient, "remote": lenient},
        }

    def start(self, timeout: float = 120.0) -> "Synapse":
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "media").mkdir(exist_ok=True)
        import signedjson.key  # shipped with Synapse

        key = signedjson.key.generate_signing_key("a_e2e")
        with open(self.dir / "signing.key", "w") as f:
            signedjson.key.write_signing_keys(f, [key])
        write_log_config(self.dir / "log.yaml", self.log)
        self.appservice_file.write_text(yaml.safe_dump(self.appservice.registration()))
        (self.dir / "homeserver.yaml").write_text(yaml.safe_dump(self._config()))
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "Synapse":
        """Run Synapse on the written homeserver.yaml; wait until every listener is healthy."""
        self.spawn(
            "synapse",
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.dir / "homeserver.yaml")],
            log=self.dir / "synapse.out",
            cwd=self.dir,
        )
        for port in [self.main_port, *self.worker_ports]:
            self.wait_for(
                lambda port=port: http_request(port, "GET", "/health", timeout=2).status == 200,
                timeout,
                f"Synapse /health on port {port}",
                interval=0.25,
            )
        return self

    def register(self, localpart: str, password: str | None = None) -> Device:
        """Create a user with the shared-secret admin registration API (directly on Synapse)."""
        password = password or secrets.token_urlsafe(12)
        nonce = http_request(self.main_port, "GET", "/_synapse/admin/v1/register").json()["nonce"]
        mac = hmac.new(self.shared_secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"]))
        body = json.dumps(
            {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": False,
                "mac": mac.hexdigest(),
            }
        ).encode()
        r = http_request(
            self.main_port,
            "POST",
            "/_synapse/admin/v1/register",
            [("Content-Type", "application/json")],
            body,
        )
        if r.status != 200:
            raise StackError(f"registering {localpart} failed: {r.status} {r.body[:300]!r}")
        data = r.json()
        self.passwords[data["user_id"]] = password
        return Device(data["user_id"], data["device_id"], data["access_token"])

    def register_appservice_user(self, localpart: str) -> str:
        """Create a user in the appservice's namespace (`m.login.application_service`, directly
        on Synapse); returns its user ID."""
        body = json.dumps(
            {"type": "m.login.application_service", "username": localpart, "inhibit_login": True}
        ).encode()
        r = http_request(
            self.main_port,
            "POST",
            "/_matrix/client/v3/register",
            [
                ("Content-Type", "application/json"),
                ("Authorization", f"Bearer {self.appservice.as_token}"),
            ],
            body,
        )
        if r.status != 200:
            raise StackError(
                f"appservice registration of {localpart} failed: {r.status} {r.body[:300]!r}"
            )
        return r.json()["user_id"]

    def processed_requests(self, user_agent: str | None = None) -> list[ProcessedRequest]:
        """Synapse's "Processed request" log lines so far (only those with `user_agent`)."""
        return read_processed_requests(self.log, user_agent)

    def wait_for_processed(
        self, user_agent: str, path: str, count: int = 1, timeout: float = 10.0
    ) -> list[ProcessedRequest]:
        """The "Processed request" lines with `user_agent`, once `count` of them are for `path`
        (Synapse logs a request when it has answered it, so the lines of requests answered
        before the last of those are there too)."""

        def enough():
            found = self.processed_requests(user_agent)
            return found if sum(p.path == path for p in found) >= count else None

        return self.wait_for(
            enough,
            timeout,
            f"{count} requests for {path} with user agent {user_agent!r} in Synapse's log",
            interval=0.05,
        )

    def send_signal(self, sig: int) -> None:
        """Signal the Synapse process (SIGKILL, SIGSTOP, SIGCONT: the fault tests)."""
        assert self.process is not None
        self.process.proc.send_signal(sig)

    def relaunch(self, timeout: float = 120.0) -> "Synapse":
        """Start Synapse again on its existing configuration, database and ports (after it was
        killed): the same users and tokens, the same listeners."""
        if self.process is not None:
            self.process.stop()  # reaps a killed process (or stops a running one)
        return self._launch(timeout)


# --------------------------------------------------------------------------------------------
# Envoy configuration: the repository's envoy.yaml with only addresses/ports/paths substituted


def _socket_address(port: int) -> dict:
    return {"address": {"socket_address": {"address": HOST, "port_value": port}}}


def _find_one(items: list, what: str, **match) -> dict:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise StackError(f"envoy.yaml: expected exactly one {what} with {match}, found {len(found)}")
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
    def ignore_aliases(self, data):  # noqa: D401 - yaml API
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

    def start(self, timeout: float = 60.0) -> "Envoy":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.dump(self.cfg, Dumper=_NoAliasDumper, sort_keys=False))
        self.access_log.touch()
        self.spawn(
            f"envoy {self.name}",
            [
                venv_bin("envoy"),
                "-c", str(self.config_path),
                "--concurrency", "2",
                *self.restart_args,
                "--file-flush-interval-msec", "20",
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
            for c in data.get("cluster_statuses", []) if c.get("name") == "synapse_sync_workers"
            for h in c.get("host_statuses", [])
        ]
        prefix = "cluster.synapse_sync_workers.health_check."
        hc = {k[len(prefix):]: v for k, v in stats.items() if k.startswith(prefix)}
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
            raise StackError(f"login of {user_id} through Envoy failed: {r.status} {r.body[:300]!r}")
        data = r.json()
        return Device(data["user_id"], data["device_id"], data["access_token"])

    # --- access log --------------------------------------------------------------------------

    def _read_access_log(self) -> None:
        with open(self.access_log, "rb") as f:
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
            raise StackError(f"request {response.request_id} was not served by a sync worker: {host}")
        return self.workers[host]

    def entries_by_user_agent(self) -> dict[str, dict]:
        """Access log entries keyed by User-Agent: the load generator (load.py) gives every
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
# the whole stack


class Stack:
    """Synapse plus any number of Envoys in one work directory under .e2e/.

    The folder holds an `owner` file (PID and start time of this process) until close(): a run
    whose owner was killed is removed by the next Stack (`remove_stale_runs`). close() stops
    everything even when signals keep arriving, may be called more than once, and runs at
    interpreter exit if nobody called it."""

    def __init__(self, wasm: Path = DEFAULT_WASM, n_workers: int = 3, prefix: str = "stack-"):
        self.wasm = Path(wasm).resolve()
        if not self.wasm.is_file():
            raise StackError(f"filter not built: {self.wasm} is missing (run `just build`)")
        stop_on_termination()
        E2E_DIR.mkdir(exist_ok=True)
        remove_stale_runs()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=E2E_DIR))
        (self.dir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        self.synapse = Synapse(self.dir / "synapse", n_workers)
        self.envoys: list[Envoy] = []
        self.closed = False
        # If the owner's own cleanup was cut short (pytest's teardown skipped by a second
        # Ctrl-C), the interpreter's exit still stops everything.
        atexit.register(self.close)

    def start(self) -> "Stack":
        try:
            self.synapse.start()
        except BaseException:
            self.close(keep_dir=False)
            raise
        return self

    def add_envoy(self, name: str, **kwargs) -> Envoy:
        envoy = Envoy(self.dir, name, self.synapse, self.wasm, **kwargs)
        self.envoys.append(envoy)
        envoy.start()
        return envoy

    def prepare_envoy(self, name: str, cls: type[Envoy] | None = None, **kwargs) -> Envoy:
        """An Envoy (of class `cls`) that the test may still change (its `cfg`, its worker
        ports) before calling start(); it is stopped with the stack."""
        envoy = (cls or Envoy)(self.dir, name, self.synapse, self.wasm, **kwargs)
        self.envoys.append(envoy)
        return envoy

    def user_with_devices(self, envoy: Envoy, localpart: str, n_devices: int) -> list[Device]:
        """Register `localpart` and log in `n_devices` devices through `envoy`."""
        first = self.synapse.register(localpart)
        password = self.synapse.passwords[first.user_id]
        return [envoy.login(first.user_id, password, f"{localpart}-dev{i + 1}") for i in range(n_devices)]

    def pids(self) -> list[int]:
        """The PIDs of the running children (Synapse, Envoys)."""
        services = [self.synapse, *self.envoys]
        return [s.process.pid for s in services if s.process]

    def ports(self) -> list[int]:
        """Every port the stack's children listen on."""
        ports = [self.synapse.main_port, *self.synapse.worker_ports]
        for envoy in self.envoys:
            ports += [envoy.port, envoy.admin_port]
        return ports

    def close(self, keep_dir: bool = False) -> None:
        """Stop every process; remove the work directory unless keep_dir (or $MSR_E2E_KEEP).
        Signals arriving meanwhile are delivered once everything is stopped."""
        with signals_deferred():
            if self.closed:
                return
            for envoy in reversed(self.envoys):
                envoy.stop()
            self.synapse.stop()
            if keep_dir or os.environ.get("MSR_E2E_KEEP"):
                (self.dir / "owner").unlink(missing_ok=True)  # kept on purpose: not stale
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
            self.closed = True

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        # Keep the logs of a failure; an interrupt (Ctrl-C, SIGTERM) is no failure.
        self.close(keep_dir=exc_type is not None and issubclass(exc_type, Exception))


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


def process_rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise StackError(f"no VmRSS for pid {pid}")


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
            "--restart-epoch", str(self.epoch),
            "--drain-time-s", str(self.drain_s),
            "--parent-shutdown-time-s", str(self.parent_shutdown_s),
        )

    def start(self, timeout: float = 60.0) -> "HotRestartEnvoy":
        super().start(timeout)
        # /ready may still be the parent's answer: wait until the admin port is this epoch's.
        self.wait_for(
            lambda: self.admin("/server_info").json()["command_line_options"]["restart_epoch"]
            == self.epoch,
            timeout,
            f"Envoy {self.name} (epoch {self.epoch}) serving its admin port",
        )
        if self.base_id is None:
            self.base_id = int(self.base_id_path.read_text().strip())
        return self

    def next_epoch(self, stack: "Stack", plugin_overrides: dict | None = None) -> "HotRestartEnvoy":
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
