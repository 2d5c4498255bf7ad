"""Synapse: one real process on SQLite whose extra `client` listeners play the sync workers, its
registered application service, and its "Processed request" log lines (listener port, recorded
client address, requester, path, user agent) read back with `Synapse.processed_requests`."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sys
from pathlib import Path

import yaml

from msrtest.env import HOST, free_ports
from msrtest.httpclient import http_request
from msrtest.matrix import SERVER_NAME, AppService, Device
from msrtest.procs import Service, StackError


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
                int(m["port"]),
                m["client"],
                m["requester"],
                m["status"],
                m["method"],
                path,
                query,
                m["ua"],
            )
        )
    return found


class Synapse(Service):
    """One Synapse process: a main listener and `n_workers` extra client listeners (0 when real
    generic_workers play the sync workers: msrtest.workers)."""

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

    def start(self, timeout: float = 120.0) -> Synapse:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "media").mkdir(exist_ok=True)
        import signedjson.key  # shipped with Synapse

        key = signedjson.key.generate_signing_key("a_e2e")
        with (self.dir / "signing.key").open("w") as f:
            signedjson.key.write_signing_keys(f, [key])
        write_log_config(self.dir / "log.yaml", self.log)
        self.appservice_file.write_text(yaml.safe_dump(self.appservice.registration()))
        (self.dir / "homeserver.yaml").write_text(yaml.safe_dump(self._config()))
        return self._launch(timeout)

    def _launch(self, timeout: float) -> Synapse:
        """Run Synapse on the written homeserver.yaml; wait until every listener is healthy."""
        self.spawn(
            "synapse",
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.dir / "homeserver.yaml"),
            ],
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
        mac.update(
            b"\x00".join([nonce.encode(), localpart.encode(), password.encode(), b"notadmin"])
        )
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

    def relaunch(self, timeout: float = 120.0) -> Synapse:
        """Start Synapse again on its existing configuration, database and ports (after it was
        killed): the same users and tokens, the same listeners."""
        if self.process is not None:
            self.process.stop()  # reaps a killed process (or stops a running one)
        return self._launch(timeout)
