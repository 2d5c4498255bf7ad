"""A real Synapse worker topology on 127.0.0.1, for test_worker_topology.py.

msrtest.synapse's Synapse is one process whose extra listeners play the sync workers; this module
starts what an operator runs instead: its own PostgreSQL cluster and redis-server (Debian
packages) under .e2e/, the Synapse main process with a replication listener, `redis: enabled`
and `instance_map.main`, and `generic_worker` processes in pools by role:

- "sync": the sync workers Envoy's `synapse_sync_workers` cluster hashes users onto;
- "initial_sync": a pool for syncs without `since` (issue 7's initial-sync split);
- "room": workers for room-keyed routing (issue 7).

Envoy runs envoy.yaml with `synapse_sync_workers` pointing at the sync pool and `synapse_main` /
`synapse_whoami` at the main process; clusters for the other pools are configured only if
envoy.yaml defines them (POOL_CLUSTERS). Every process is a Process (own session, killed
with its group) logging to the run's directory; each Synapse process writes its own log, whose
"Processed request" lines (read_processed_requests) say which worker served whom.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import yaml

from msrtest.env import DEFAULT_WASM, E2E_DIR, HOST, free_ports
from msrtest.envoy import Envoy
from msrtest.httpclient import http_request
from msrtest.procs import Process, Service, StackError, tail
from msrtest.synapse import ProcessedRequest, Synapse, read_processed_requests, write_log_config

# Worker pools by role, and how many generic_workers each gets by default.
DEFAULT_POOLS = {"sync": 2, "initial_sync": 1, "room": 2}
# The Envoy cluster each pool is served by. "sync" is envoy.yaml's; the others are configured
# only when envoy.yaml has them (the routes of issue 7 are designed elsewhere).
POOL_CLUSTERS = {
    "sync": "synapse_sync_workers",
    "initial_sync": "synapse_initial_sync_workers",
    "room": "synapse_room_workers",
}
# The sync family's /sync paths (as Synapse logs them: without the query string).
SYNC_PATH = re.compile(r"^/_matrix/client/(api/v1|r0|v3|unstable)/sync$")
# Client API paths keyed by a room: /rooms/{room_id}/<anything but initialSync>.
_ROOM_PATH = re.compile(
    r"^/_matrix/client/(?:api/v1|r0|v3|unstable)/rooms/(?P<room>[^/]+)/(?!initialSync$)"
)
PG_USER = "postgres"  # the OS user the Debian package creates; postgres refuses to run as root
DB_ROLE = "synapse"


class MissingDependency(StackError):
    """PostgreSQL or Redis is not installed: the topology cannot run here (tests skip)."""


# --------------------------------------------------------------------------------------------
# PostgreSQL and Redis


def pg_binary(name: str) -> str:
    """A PostgreSQL server binary: on PATH, else Debian's /usr/lib/postgresql/<newest>/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        (str(p) for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}")),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise MissingDependency(f"PostgreSQL's {name} not found (apt-get install postgresql)")
    return candidates[-1]


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise MissingDependency("redis-server not found (apt-get install redis-server)")
    return found


def check_dependencies() -> None:
    """Raise MissingDependency naming what is missing."""
    pg_binary("initdb")
    pg_binary("postgres")
    redis_binary()
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(PG_USER)
        except KeyError:
            raise MissingDependency(
                f"running as root, and there is no {PG_USER!r} user to run PostgreSQL as"
            ) from None
        if not shutil.which("runuser"):
            raise MissingDependency("running as root, and runuser (util-linux) is missing")


def _pg_user_can_write(path: Path) -> bool:
    """Whether PostgreSQL's user can reach and write `path` (every parent searchable)."""
    probe = as_pg_user(["test", "-w", str(path), "-a", "-x", str(path)])
    return subprocess.run(probe, stdin=subprocess.DEVNULL).returncode == 0


def as_pg_user(argv: list[str]) -> list[str]:
    """PostgreSQL will not run as root: as root, run it as the Debian package's user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--", *argv]
    return argv


class Postgres(Service):
    """A throw-away PostgreSQL cluster (initdb in the run directory, trust auth on 127.0.0.1,
    no fsync) with one database for Synapse (C collation, as Synapse requires)."""

    def __init__(self, workdir: Path, port: int):
        self.dir = workdir
        self.port = port
        # Where the cluster and its socket live: self.dir, unless PostgreSQL's user cannot reach
        # it (a checkout under a private home directory); then a directory of its own in /tmp.
        self.home = workdir
        self.home_is_outside = False
        # More `-c name=value` server settings, set before launch() (the Synapse bench's).
        self.extra_settings: list[str] = []

    @property
    def log(self) -> Path:
        return self.dir / "postgres.log"

    def launch(self) -> None:
        """initdb, then start the server (does not wait for it: see wait_ready)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, PG_USER)
            if not _pg_user_can_write(self.dir):
                self.home = Path(tempfile.mkdtemp(prefix="msr-e2e-postgres-"))
                self.home_is_outside = True
                shutil.chown(self.home, PG_USER)
                (self.dir / "WHERE").write_text(f"cluster and socket in {self.home}\n")
        with self.log.open("ab") as log:
            result = subprocess.run(
                as_pg_user(
                    [
                        pg_binary("initdb"),
                        "-D",
                        str(self.data),
                        "-U",
                        DB_ROLE,
                        "--auth=trust",
                        "--locale=C",
                        "--encoding=UTF8",
                        "--no-sync",
                    ]
                ),
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if result.returncode != 0:
            raise StackError(f"initdb failed ({result.returncode}):\n{tail(self.log)}")
        self.process = Process(
            "postgres",
            as_pg_user(
                [
                    pg_binary("postgres"),
                    "-D",
                    str(self.data),
                    "-h",
                    HOST,
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.home),
                    # A test database: durability is not wanted, speed is.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                    *(arg for setting in self.extra_settings for arg in ("-c", setting)),
                ]
            ),
            log=self.log,
            cwd=self.home,
        )

    @property
    def data(self) -> Path:
        return self.home / "data"

    def remove_outside_home(self) -> None:
        """Remove the cluster's /tmp directory, if it needed one (close() removes the rest)."""
        if self.home_is_outside:
            shutil.rmtree(self.home, ignore_errors=True)

    def _connect(self, dbname: str):
        import psycopg2  # Synapse's `postgres` extra (pinned in requirements.txt)

        return psycopg2.connect(host=HOST, port=self.port, user=DB_ROLE, dbname=dbname)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the server accepts connections; create Synapse's database."""
        import psycopg2

        def accepting():
            try:
                self._connect("postgres").close()
                return True
            except psycopg2.OperationalError:
                return False

        self.wait_for(accepting, timeout, f"PostgreSQL on port {self.port}", interval=0.1)
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "CREATE DATABASE synapse TEMPLATE template0 ENCODING 'UTF8'"
                    " LC_COLLATE 'C' LC_CTYPE 'C'"
                )
        finally:
            conn.close()

    def stop(self) -> None:
        """Immediate shutdown (SIGQUIT: no shutdown checkpoint; the cluster is thrown away, and a
        kept one still recovers on start), then Process's SIGTERM/SIGKILL of the group."""
        if self.process and self.process.proc.poll() is None:
            try:
                os.killpg(self.process.proc.pid, signal.SIGQUIT)
                self.process.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        super().stop()

    def synapse_database(self) -> dict:
        """Synapse's `database` section for this cluster."""
        return {
            "name": "psycopg2",
            "args": {
                "user": DB_ROLE,
                "database": "synapse",
                "host": HOST,
                "port": self.port,
                "cp_min": 1,
                "cp_max": 5,
            },
        }


class Redis(Service):
    """A redis-server on 127.0.0.1 without persistence (Synapse's replication pub/sub)."""

    def __init__(self, workdir: Path, port: int):
        self.dir = workdir
        self.port = port

    def launch(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = Process(
            "redis",
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            log=self.dir / "redis.log",
            cwd=self.dir,
        )

    def _ping(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_for(self._ping, timeout, f"redis on port {self.port}")


# --------------------------------------------------------------------------------------------
# Synapse: the main process and generic_workers


class WorkerMain(Synapse):
    """Synapse's main process in a worker deployment: PostgreSQL, Redis, and an HTTP
    replication listener named `main` in `instance_map` (workers send it the events they
    create; every other stream it writes reaches them over Redis)."""

    def __init__(
        self, workdir: Path, postgres: Postgres, redis: Redis, port: int, replication_port: int
    ):
        super().__init__(workdir, n_workers=0)
        self.main_port = port
        self.replication_port = replication_port
        self.postgres = postgres
        self.redis = redis
        # Top-level homeserver.yaml settings on top of these, set before start() (the Synapse
        # bench's `enable_metrics`).
        self.extra_config: dict = {}

    @property
    def config_path(self) -> Path:
        return self.dir / "homeserver.yaml"  # Synapse.start writes it

    def _config(self) -> dict:
        cfg = super()._config()
        cfg["listeners"].append(
            {
                "port": self.replication_port,
                "bind_addresses": [HOST],
                "type": "http",
                "tls": False,
                "resources": [{"names": ["replication"], "compress": False}],
            }
        )
        cfg["database"] = self.postgres.synapse_database()
        cfg["redis"] = {"enabled": True, "host": HOST, "port": self.redis.port}
        cfg["instance_map"] = {"main": {"host": HOST, "port": self.replication_port}}
        cfg.update(self.extra_config)
        return cfg


class GenericWorker(Service):
    """One `synapse.app.generic_worker` with a client listener, sharing the main process's
    homeserver.yaml (plus its own worker file and log)."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        role: str,
        port: int,
        main: WorkerMain,
        metrics_port: int | None = None,
    ):
        self.dir = workdir
        self.name = name
        self.role = role
        self.port = port
        self.main = main
        # A Prometheus `metrics` listener (needs `enable_metrics` in homeserver.yaml: the bench).
        self.metrics_port = metrics_port

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def launch(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log_config = self.dir / f"{self.name}.log.yaml"
        write_log_config(log_config, self.log)
        worker_file = self.dir / f"{self.name}.yaml"
        listeners = [
            {
                "type": "http",
                "port": self.port,
                "bind_addresses": [HOST],
                "x_forwarded": True,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        if self.metrics_port is not None:
            listeners.append(
                {"type": "metrics", "port": self.metrics_port, "bind_addresses": [HOST]}
            )
        worker_file.write_text(
            yaml.safe_dump(
                {
                    "worker_app": "synapse.app.generic_worker",
                    "worker_name": self.name,
                    "worker_listeners": listeners,
                    "worker_log_config": str(log_config),
                }
            )
        )
        self.process = Process(
            self.name,
            [
                sys.executable,
                "-m",
                "synapse.app.generic_worker",
                "-c",
                str(self.main.config_path),
                "-c",
                str(worker_file),
            ],
            log=self.dir / f"{self.name}.out",
            cwd=self.dir,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.wait_for(
            lambda: http_request(self.port, "GET", "/health", timeout=2).status == 200,
            timeout,
            f"{self.name} /health on port {self.port}",
            interval=0.25,
        )

    def processed_requests(self) -> list[ProcessedRequest]:
        """The requests this worker answered, from its own log."""
        return read_processed_requests(self.log)


# --------------------------------------------------------------------------------------------
# the whole topology


def room_of(path: str) -> str | None:
    """The room ID a client API path is keyed by, percent-decoded (clients such as matrix-nio
    send `%21id%3Aserver`, others `!id:server`: both are one room), else None."""
    m = _ROOM_PATH.match(path)
    return urllib.parse.unquote(m["room"]) if m else None


def worker_name(role: str, index: int) -> str:
    """Synapse's `worker_name` and the log files' names: "sync-1", "initial-sync-1", "room-2"."""
    return f"{role.replace('_', '-')}-{index + 1}"


class WorkerStack:
    """PostgreSQL, Redis, Synapse main, generic_worker pools and Envoys in one directory under
    .e2e/ (removed by close() unless the run failed or $MSR_E2E_KEEP is set)."""

    def __init__(
        self,
        wasm: Path = DEFAULT_WASM,
        pools: dict[str, int] | None = None,
        prefix: str = "workers-",
        metrics: bool = False,
    ):
        """`metrics`: `enable_metrics` and a Prometheus listener on every worker
        (GenericWorker.metrics_port), for the Synapse bench."""
        self.wasm = Path(wasm).resolve()
        if not self.wasm.is_file():
            raise StackError(f"filter not built: {self.wasm} is missing (run `just build`)")
        check_dependencies()
        pools = dict(DEFAULT_POOLS if pools is None else pools)
        unknown = set(pools) - set(POOL_CLUSTERS)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(POOL_CLUSTERS)}")
        E2E_DIR.mkdir(exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=E2E_DIR))
        self.dir.chmod(0o755)  # mkdtemp's 0700 would keep PostgreSQL's user out
        # All ports in one call, so no two of them can be the same.
        n_workers = sum(pools.values())
        pg_port, redis_port, main_port, repl_port, *worker_ports = free_ports(
            4 + n_workers * (2 if metrics else 1)
        )
        self.postgres = Postgres(self.dir / "postgres", pg_port)
        self.redis = Redis(self.dir / "redis", redis_port)
        self.main = WorkerMain(self.dir / "main", self.postgres, self.redis, main_port, repl_port)
        if metrics:
            self.main.extra_config["enable_metrics"] = True
        ports = iter(worker_ports)
        metrics_ports = iter(worker_ports[n_workers:] if metrics else [])
        self.workers = [
            GenericWorker(
                self.dir / "workers",
                worker_name(role, i),
                role,
                next(ports),
                self.main,
                metrics_port=next(metrics_ports, None),
            )
            for role, n in pools.items()
            for i in range(n)
        ]
        self.envoys: list[Envoy] = []
        self.timings: dict[str, float] = {}  # seconds each start-up phase took

    # --- start / stop --------------------------------------------------------------------

    def _phase(self, name: str, started: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - started, 2)
        return now

    def start(self) -> WorkerStack:
        """Start everything, in parallel where the dependencies allow: redis and PostgreSQL
        together; the main process (which creates the schema) before any worker; all workers
        at once."""
        try:
            t0 = t = time.monotonic()
            self.redis.launch()
            self.postgres.launch()
            self.postgres.wait_ready()
            self.redis.wait_ready()
            t = self._phase("postgres+redis", t)
            self.main.start()
            t = self._phase("synapse main (schema)", t)
            for worker in self.workers:
                worker.launch()
            for worker in self.workers:
                worker.wait_ready()
            self._phase(f"{len(self.workers)} generic_workers", t)
            self.timings["total"] = round(time.monotonic() - t0, 2)
        except BaseException:
            self.close(keep_dir=True)
            raise
        return self

    def add_envoy(self, name: str = "workers", **kwargs) -> Envoy:
        """Envoy running envoy.yaml in front of this topology (kwargs go to Envoy)."""
        t = time.monotonic()
        optional = {
            POOL_CLUSTERS[role]: self.ports(role) for role in self.roles() if role != "sync"
        }
        envoy = Envoy(
            self.dir,
            name,
            self.main,
            self.wasm,
            sync_ports=self.ports("sync"),
            optional_clusters=optional,
            **kwargs,
        )
        self.envoys.append(envoy)
        envoy.start()
        self._phase(f"envoy {name}", t)
        return envoy

    def close(self, keep_dir: bool = False) -> None:
        """Stop every process (Envoys; then all Synapse processes at once; then redis and
        PostgreSQL, whose clients are gone by then); remove the directory unless keep_dir or
        $MSR_E2E_KEEP."""
        for envoy in reversed(self.envoys):
            envoy.stop()
        for group in ([*self.workers, self.main], [self.redis, self.postgres]):
            with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
                list(pool.map(lambda service: service.stop(), group))
        if not keep_dir and not os.environ.get("MSR_E2E_KEEP"):
            self.postgres.remove_outside_home()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> WorkerStack:
        return self.start()

    def __exit__(self, exc_type, *_) -> None:
        self.close(keep_dir=exc_type is not None)

    # --- who is who ----------------------------------------------------------------------

    def roles(self) -> list[str]:
        return list(dict.fromkeys(w.role for w in self.workers))

    def pool(self, role: str) -> list[GenericWorker]:
        return [w for w in self.workers if w.role == role]

    def ports(self, role: str) -> list[int]:
        return [w.port for w in self.pool(role)]

    def role_of(self, port: int) -> str:
        """The role ("main", "sync", "initial_sync", "room") of a client listener's port."""
        if port == self.main.main_port:
            return "main"
        for worker in self.workers:
            if worker.port == port:
                return worker.role
        raise KeyError(f"port {port} is no listener of this topology")

    def worker_at(self, port: int) -> GenericWorker:
        for worker in self.workers:
            if worker.port == port:
                return worker
        raise KeyError(f"port {port} is no generic_worker of this topology")

    def served(self) -> dict[str, list[ProcessedRequest]]:
        """Every process's "Processed request" lines from its own log, by process name
        ("main" or the worker's name)."""
        served = {"main": self.main.processed_requests()}
        for worker in self.workers:
            served[worker.name] = worker.processed_requests()
        return served
