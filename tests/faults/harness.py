"""Fault injection against a running mesh (issue 24): the launcher's mesh with its supervisor, open-loop load,
one fault per row, then the verdict from the clients' side and from the PostgreSQL ledger.

The mesh is the one ``tollgate up`` serves (``ops.cli.start_mesh`` and ``ops.launcher.Supervisor``), with its
own private Redis and PostgreSQL (so that they can be killed and stopped without touching anything else), the
bundled fake OpenAI-style provider, and ``replicas`` inference processes. The load is what a platform sees:
keep-alive HTTP clients on the edge at a fixed rate each (open loop: a slow answer does not slow the sender),
20 % of prompts repeated (cache hits), one gRPC client asking for retrieval, and one key with a small
requests-per-minute limit sending far over it (unique prompts: a cache hit is served before admission and
spends no limit).

A fault is a signal to one process: SIGKILL (the supervisor restarts it), SIGSTOP for ``hang_s`` then SIGCONT
(every process of PostgreSQL), SIGKILL held down for ``hang_s`` (the supervisor only sees the exit once the
hold ends), or a fast shutdown of PostgreSQL (SIGINT to the postmaster; the supervisor starts it again).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import asyncpg
import grpc
import httpx
import psutil
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from ops.cli import start_mesh
from ops.launcher import LauncherSettings, Mesh, Supervised, Supervisor, free_port, port_in_use

MODEL = "faults-small"
# Keys made for the load are limited to this many requests per minute; the limited key is far over it.
LIMITED_KEY_RPM = 10
# Environment of every service of a fault mesh: faster limit propagation than the defaults, so a key made
# just before a row is limited in it (the defaults are what a deployment uses; these only shorten the wait).
SERVICE_ENV = {"TOLLGATE_RATELIMIT_LIMITS_REFRESH_S": "0.5", "TOLLGATE_ROUTER_REGISTRY_REFRESH_S": "0.5"}

Action = Literal["none", "kill", "hang", "kill_hold", "fast_restart"]


@dataclass(frozen=True)
class Fault:
    """One row of the table: ``action`` on ``target`` (a supervised unit's name)."""

    name: str
    action: Action
    target: str = ""
    # Seconds of admissions the fault may make the limiter forget, by design: a SIGKILLed Redis loses what it
    # had not yet written to its append-only file (appendfsync everysec: at most the last second).
    forgotten_s: float = 0.0

    @property
    def hangs(self) -> bool:
        return self.action in ("hang", "kill_hold")


# The rows of issue 24's table, plus the hangs it did not list (retrieval, Redis, the second replica).
FAULTS: tuple[Fault, ...] = (
    Fault("none", "none"),
    Fault("SIGKILL cache", "kill", "cache"),
    Fault("SIGKILL ratelimit", "kill", "ratelimit"),
    Fault("SIGKILL retrieval", "kill", "retrieval"),
    Fault("SIGKILL inference (1 of 2)", "kill", "inference"),
    Fault("SIGSTOP PostgreSQL", "hang", "postgres"),
    Fault("SIGSTOP ratelimit", "hang", "ratelimit"),
    Fault("SIGSTOP cache", "hang", "cache"),
    Fault("SIGSTOP retrieval", "hang", "retrieval"),
    Fault("SIGSTOP inference (1 of 2)", "hang", "inference"),
    Fault("SIGKILL Redis, down for the hang", "kill_hold", "redis", forgotten_s=1.0),
    Fault("SIGSTOP Redis", "hang", "redis"),
    Fault("PostgreSQL fast restart", "fast_restart", "postgres"),
)
# With one inference replica a kill leaves nothing to fail over to: answered or a quick 503, never a hang.
SINGLE_REPLICA_FAULT = Fault("SIGKILL inference (single replica)", "kill", "inference")


@dataclass(frozen=True)
class Timing:
    """Load ``fault_at_s`` before the fault; a hang lasts ``hang_s``; the load goes on until ``recover_s`` plus
    ``post_s`` after the fault ended (a killed part ends its fault when it serves again)."""

    fault_at_s: float
    hang_s: float
    recover_s: float = 5.0
    post_s: float = 5.0
    rate_per_client: float = 12.0
    http_clients: int = 3
    grpc_clients: int = 1
    limited_rate: float = 2.0
    repeat_share: float = 0.2
    # Share of HTTP requests that are malformed (a 400 is their right answer; they count neither way).
    bad_share: float = 0.0
    request_timeout_s: float = 30.0


FULL = Timing(fault_at_s=10.0, hang_s=20.0)
SHORT = Timing(fault_at_s=2.0, hang_s=4.0, post_s=2.0)


# ---------------------------------------------------------------------------------------------- the mesh


class _Holdable:
    """A supervised unit whose exit the supervisor does not see while ``held`` (a part kept down on purpose)."""

    def __init__(self, unit: Supervised) -> None:
        self.unit = unit
        self.held = False

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def log_path(self) -> Path:
        return self.unit.log_path

    def exit_code(self) -> int | None:
        return None if self.held else self.unit.exit_code()

    def restart(self) -> None:
        self.unit.restart()

    def healthy(self) -> bool:
        return self.unit.healthy()


@dataclass
class FaultMesh:
    """A mesh as ``tollgate up`` runs it, supervised from a thread; ``close()`` stops everything."""

    mesh: Mesh
    admin_key: str
    units: dict[str, _Holdable]
    supervisor_log: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    failure: BaseException | None = None
    limited_keys: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, data_dir: Path, replicas: int = 2, extra_env: dict[str, str] | None = None) -> FaultMesh:
        ports = _free_ports(5 + 1)  # router, cache, ratelimit, retrieval, edge, fake provider
        inference_port = _free_port_run(replicas)
        settings = LauncherSettings(data_dir=data_dir, redis_url="", database_url="").model_copy(update={
            "router_port": ports[0], "cache_port": ports[1], "ratelimit_port": ports[2], "retrieval_port": ports[3],
            "edge_port": ports[4], "fake_provider_port": ports[5], "inference_port": inference_port,
            "inference_replicas": replicas, "inference_engine": "openai", "inference_models": MODEL,
            "provider_base_url": ""})
        env = {**SERVICE_ENV, **(extra_env or {})}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            # Started from the calling (long-lived) thread: a child dies with the thread that spawned it.
            mesh, admin_key = start_mesh(settings)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert admin_key is not None, "a fresh data folder must bootstrap an admin key"
        units = {u.name: _Holdable(u) for u in mesh.supervised()}
        fm = cls(mesh, admin_key, units)
        fm._thread = threading.Thread(target=fm._supervise, name="fault-supervisor", daemon=True)
        fm._thread.start()
        # A fresh limited key per row (a full bucket each), all made now: by the time a row uses one its limit
        # has long reached the ratelimit service and the router's limit book, whatever the row before it hung.
        fm.limited_keys = asyncio.run(_make_limited_keys(fm, len(FAULTS) + 2))
        time.sleep(2.0)
        return fm

    async def take_limited_key(self) -> str:
        """A limited key no row has used; when the ones made at start are spent (rows run again), a new one, after
        the wait for its limit to arrive."""
        if not self.limited_keys:
            self.limited_keys = await _make_limited_keys(self, 4)
            await asyncio.sleep(2.0)
        return self.limited_keys.pop(0)

    def _supervise(self) -> None:
        supervisor = Supervisor(list(self.units.values()), report=self.supervisor_log.append)
        try:
            while not self._stop.is_set():
                supervisor.tick()
                self._stop.wait(0.1)
        except BaseException as exc:  # MeshFailed: the row that caused it fails on `failure`
            self.failure = exc

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.mesh.stop()

    @property
    def database_url(self) -> str:
        return self.mesh.env["TOLLGATE_DATABASE_URL"]

    def pids(self, target: str) -> list[int]:
        """The processes of ``target``: PostgreSQL is its postmaster and every backend and worker under it."""
        if target == "postgres":
            assert self.mesh.postgres is not None and self.mesh.postgres.server is not None
            info = self.mesh.postgres.server.get_postmaster_info()  # type: ignore[attr-defined]
            root = psutil.Process(int(info.pid))
            return [root.pid, *(p.pid for p in root.children(recursive=True))]
        if target == "redis":
            assert self.mesh.redis is not None and self.mesh.redis.proc is not None
            return [self.mesh.redis.proc.pid]
        return [self.mesh.child(target).proc.pid]

    def healthy(self, target: str) -> bool:
        return self.units[target].healthy() and self.units[target].exit_code() is None

    def wait_healthy(self, target: str, timeout_s: float = 60.0) -> float:
        """Seconds until ``target`` serves (raises at the timeout)."""
        t0 = time.monotonic()
        while not self.healthy(target):
            if self.failure is not None:
                raise RuntimeError(f"the supervisor stopped the mesh: {self.failure}")
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{target} did not serve again within {timeout_s:.0f} s")
            time.sleep(0.05)
        return time.monotonic() - t0


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (the launcher puts replica i on inference_port + i)."""
    for _ in range(100):
        first = free_port()
        if all(not port_in_use("127.0.0.1", first + i) for i in range(n)):
            return first
    raise RuntimeError(f"no {n} consecutive free ports")


async def make_key(fm: FaultMesh, name: str, rpm: int = 0) -> tuple[str, str]:
    """A member key in the bootstrap org and team (with a requests-per-minute limit when ``rpm``)."""
    md = (("authorization", f"Bearer {fm.admin_key}"),)
    async with grpc.aio.insecure_channel(fm.mesh.router_address) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
        created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=p.org_id, team_id=p.team_id, name=name, role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)
        if rpm:
            await admin.SetLimits(admin_pb2.SetLimitsRequest(
                scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, requests_per_minute=rpm), metadata=md)
    return created.key_id, created.key


async def _make_limited_keys(fm: FaultMesh, n: int) -> list[str]:
    return [(await make_key(fm, f"faults-limited-{i}", rpm=LIMITED_KEY_RPM))[1] for i in range(n)]


# ---------------------------------------------------------------------------------------------- the load


@dataclass(frozen=True)
class Sample:
    """One request as its client saw it: times are seconds since the load started."""

    start: float
    end: float
    outcome: str  # "200", another HTTP status, a gRPC code name, or "timeout" / "error:<type>"
    request_id: str
    via: str  # "http" | "grpc"
    limited_key: bool = False
    retry_after: bool = False
    bad: bool = False

    @property
    def served(self) -> bool:
        return self.outcome in ("200", "OK")

    @property
    def latency(self) -> float:
        return self.end - self.start


class Load:
    """Open-loop clients: each sends at its own fixed rate on one keep-alive connection pool until stopped."""

    def __init__(self, fm: FaultMesh, key: str, limited_key: str, timing: Timing, tag: str) -> None:
        self._fm, self._key, self._limited, self._t, self._tag = fm, key, limited_key, timing, tag
        self.samples: list[Sample] = []
        self._stopping = asyncio.Event()
        self._t0 = 0.0
        self._rng = random.Random(tag)
        self._repeats = [f"fault suite repeated question {i}: what does a gateway do?" for i in range(8)]

    def now(self) -> float:
        return time.monotonic() - self._t0

    def stop(self) -> None:
        self._stopping.set()

    def _prompt(self, unique: bool = False) -> str:
        if not unique and self._rng.random() < self._t.repeat_share:
            return self._rng.choice(self._repeats)
        return f"fault suite {self._tag} question {uuid.uuid4().hex}"

    async def run(self) -> None:
        self._t0 = time.monotonic()
        rate, n_http = self._t.rate_per_client, self._t.http_clients
        clients = [self._http_client(self._key, rate, phase=i / (rate * (n_http + 1))) for i in range(n_http)]
        clients += [self._grpc_client(rate) for _ in range(self._t.grpc_clients)]
        clients.append(self._http_client(self._limited, self._t.limited_rate, phase=0.0, limited=True))
        await asyncio.gather(*clients)

    async def _paced(self, rate: float, phase: float, send: object) -> None:
        tasks: set[asyncio.Task[None]] = set()
        k = 0
        while not self._stopping.is_set():
            due = phase + k / rate
            delay = due - self.now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    break
            task = asyncio.create_task(send())  # type: ignore[operator]
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.gather(*tasks)

    def _bad_body(self, body: dict[str, object]) -> dict[str, object]:
        """One of the malformed requests clients really send."""
        kind = self._rng.randrange(4)
        if kind == 0:
            return {**body, "temperature": 7}
        if kind == 1:
            return {**body, "messages": []}
        if kind == 2:
            return {**body, "max_tokens": -1}
        return {"model": MODEL}

    async def _http_client(self, key: str, rate: float, phase: float, limited: bool = False) -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=f"{self._fm.mesh.edge_url}/v1", limits=limits, trust_env=False,
                                     headers={"authorization": f"Bearer {key}"},
                                     timeout=self._t.request_timeout_s) as client:
            async def send() -> None:
                body: dict[str, object] = {
                    "model": MODEL, "messages": [{"role": "user", "content": self._prompt(unique=limited)}],
                    "max_tokens": 16, "temperature": 0}
                bad = not limited and self._rng.random() < self._t.bad_share
                if bad:
                    body = self._bad_body(body)
                start = self.now()
                try:
                    resp = await client.post("/chat/completions", json=body)
                    outcome, rid = str(resp.status_code), resp.headers.get("x-request-id", "")
                    retry_after = "retry-after" in resp.headers
                except httpx.TimeoutException:
                    outcome, rid, retry_after = "timeout", "", False
                except httpx.HTTPError as exc:
                    outcome, rid, retry_after = f"error:{type(exc).__name__}", "", False
                self.samples.append(Sample(start, self.now(), outcome, rid, "http", limited, retry_after, bad))

            await self._paced(rate, phase, send)

    async def _grpc_client(self, rate: float) -> None:
        md = (("authorization", f"Bearer {self._key}"),)
        async with grpc.aio.insecure_channel(self._fm.mesh.router_address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            async def send() -> None:
                req = router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
                    model=MODEL,
                    messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=self._prompt())],
                    params=common_pb2.GenerationParams(max_output_tokens=16, temperature=0),
                    retrieval=router_pb2.RetrievalOptions(enabled=True, top_k=3)))
                start = self.now()
                call = stub.Generate(req, metadata=md, timeout=self._t.request_timeout_s)
                try:
                    resp = await call
                    outcome, rid = "OK", resp.summary.request_id
                except grpc.aio.AioRpcError as exc:
                    trailers = dict(exc.trailing_metadata() or ())
                    outcome, rid = exc.code().name, str(trailers.get("x-request-id", ""))
                    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        outcome = "timeout"
                self.samples.append(Sample(start, self.now(), outcome, rid, "grpc"))

            await self._paced(rate, 0.5 / rate, send)


# ---------------------------------------------------------------------------------------------- one row


@dataclass
class RowResult:
    fault: Fault
    samples: list[Sample]
    fault_start: float
    fault_end: float
    recover_s: float
    ledger_missing: list[str]
    ledger_rows: int
    limit: int
    restarts: list[str]
    mesh_failure: str = ""

    def _load(self) -> list[Sample]:
        return [s for s in self.samples if not s.limited_key and not s.bad]

    @property
    def requests(self) -> int:
        return len(self._load())

    @property
    def served(self) -> int:
        return sum(s.served for s in self._load())

    @property
    def served_share(self) -> float:
        return self.served / self.requests if self.requests else 0.0

    @property
    def failures(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._load():
            if not s.served:
                out[s.outcome] = out.get(s.outcome, 0) + 1
        return out

    def window(self, start: float, end: float) -> list[float]:
        return sorted(s.latency for s in self._load() if start <= s.start < end)

    @property
    def during(self) -> list[float]:
        """Latencies of the requests sent while the fault lasted (at least one second of them)."""
        return self.window(self.fault_start, max(self.fault_end, self.fault_start + 1.0))

    @property
    def after(self) -> list[float]:
        """Latencies of the requests sent from ``recover_s`` after the fault ended."""
        return self.window(self.fault_end + self.recover_s, float("inf"))

    @property
    def limited_served(self) -> int:
        return sum(s.served for s in self.samples if s.limited_key)

    @property
    def limited_sent(self) -> int:
        return sum(1 for s in self.samples if s.limited_key)

    @property
    def limited_bound(self) -> int:
        """What the key's limit allows over the row: a token bucket of ``limit`` refilling ``limit`` per minute
        admits at most ``limit + limit * T / 60`` in T seconds (the same with or without the fault), T from the
        key's first request sent to its last answered."""
        limited = [s for s in self.samples if s.limited_key]
        if not limited:
            return self.limit
        # Every admission of the key happened between its first send and its last answer.
        span = max(s.end for s in limited) - min(s.start for s in limited)
        forgotten = math.ceil(self.fault.forgotten_s * len(limited) / span) if span else 0
        return self.limit + int(self.limit * span / 60.0) + forgotten


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


@dataclass(frozen=True)
class Bar:
    """What every row must show (issue 24)."""

    served_share: float = 0.999
    p99_during_s: float = 1.0
    # "Normal latency" after recovery: the fault-free row's p99 times this, and never under the floor.
    normal_p99_factor: float = 3.0
    normal_p99_floor_s: float = 0.25


def _limit_and_ledger(row: RowResult) -> list[str]:
    """The checks every row shares, whatever its latency bar: the mesh kept running, the limit held, the ledger."""
    problems: list[str] = []
    if row.mesh_failure:
        problems.append(f"the supervisor stopped the mesh: {row.mesh_failure}")
    if row.limited_served > row.limited_bound:
        problems.append(f"limited key: {row.limited_served} served, over the {row.limited_bound} its limit of "
                        f"{row.limit}/min allows")
    if row.ledger_missing:
        problems.append(f"{len(row.ledger_missing)} served requests missing from the ledger")
    return problems


def verdict(row: RowResult, baseline_p99_s: float, bar: Bar = Bar()) -> list[str]:
    """What the row fails of the bar (empty: it passes)."""
    problems: list[str] = []
    if row.served_share < bar.served_share:
        problems.append(f"served {row.served}/{row.requests} ({row.served_share:.2%}); failures {row.failures}")
    p99 = percentile(row.during, 0.99)
    if p99 >= bar.p99_during_s:
        problems.append(f"p99 while faulted {p99 * 1000:.0f} ms >= {bar.p99_during_s * 1000:.0f} ms")
    problems += _limit_and_ledger(row)
    normal = max(bar.normal_p99_floor_s, bar.normal_p99_factor * baseline_p99_s)
    after = row.after
    if not after:
        problems.append("no requests after recovery")
    elif percentile(after, 0.99) > normal:
        problems.append(f"p99 {percentile(after, 0.99) * 1000:.0f} ms from {row.recover_s:g} s after the fault "
                        f"ended, over normal ({normal * 1000:.0f} ms)")
    return problems


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def _inject(fm: FaultMesh, fault: Fault, timing: Timing) -> tuple[float, float]:
    """Apply ``fault``; returns (start, end) in monotonic seconds, end when it is over (a killed part serves)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    if fault.action == "none":
        await asyncio.sleep(timing.hang_s)
        return start, time.monotonic()
    pids = fm.pids(fault.target)
    if fault.action == "hang":
        _signal_all(pids, signal.SIGSTOP)
        try:
            await asyncio.sleep(timing.hang_s)
        finally:
            # Processes PostgreSQL started while stopped (none expected) are resumed too.
            _signal_all(fm.pids(fault.target) if fault.target == "postgres" else pids, signal.SIGCONT)
        return start, time.monotonic()
    unit = fm.units[fault.target]
    if fault.action == "kill_hold":
        unit.held = True
        _signal_all(pids, signal.SIGKILL)
        await asyncio.sleep(timing.hang_s)
        unit.held = False
    elif fault.action == "kill":
        _signal_all(pids, signal.SIGKILL)
    elif fault.action == "fast_restart":
        _signal_all(pids[:1], signal.SIGINT)  # the postmaster: fast shutdown
    await asyncio.sleep(0.3)  # let the supervisor notice the exit before asking whether it is back
    await loop.run_in_executor(None, fm.wait_healthy, fault.target, 60.0)
    return start, time.monotonic()


async def ledger_missing(database_url: str, request_ids: Sequence[str],
                         timeout_s: float = 30.0) -> tuple[list[str], int]:
    """The served request ids not in ``usage_ledger`` once the writer caught up (waits up to ``timeout_s``),
    and how many of them are there."""
    want = sorted(set(request_ids))
    deadline = time.monotonic() + timeout_s
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            rows = await conn.fetch("SELECT request_id FROM usage_ledger WHERE request_id = ANY($1::text[])", want)
            found = {r["request_id"] for r in rows}
            missing = [rid for rid in want if rid not in found]
            if not missing or time.monotonic() > deadline:
                return missing, len(found)
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


async def run_row(fm: FaultMesh, fault: Fault, timing: Timing) -> RowResult:
    """Load, the fault at ``fault_at_s``, load until ``recover_s + post_s`` after it ended; then the ledger."""
    tag = uuid.uuid4().hex[:8]
    _, key = await make_key(fm, f"faults-load-{tag}")
    limited = await fm.take_limited_key()
    log_from = len(fm.supervisor_log)
    load = Load(fm, key, limited, timing, tag)
    runner = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(timing.fault_at_s)
        t0 = load._t0
        start, end = await _inject(fm, fault, timing)
        await asyncio.sleep(timing.recover_s + timing.post_s)
    finally:
        load.stop()
        await runner
    served_ids = [s.request_id for s in load.samples if s.served]
    missing, found = await ledger_missing(fm.database_url, served_ids)
    return RowResult(fault, load.samples, start - t0, end - t0, timing.recover_s, missing, found, LIMITED_KEY_RPM,
                     fm.supervisor_log[log_from:], mesh_failure=str(fm.failure or ""))


# ---------------------------------------------------------------------------------------------- the table


def table(rows: Sequence[RowResult], baseline_p99_s: float) -> str:
    head = ("| fault | served | p50 / p99 while faulted | p99 after recovery | limited key served "
            f"(limit {LIMITED_KEY_RPM}/min) | ledger | verdict |\n|---|---:|---:|---:|---:|---|---|")
    lines = [head]
    for r in rows:
        during, after = r.during, r.after
        problems = verdict(r, baseline_p99_s)
        ledger = "exact" if not r.ledger_missing else f"{len(r.ledger_missing)} missing"
        lines.append(
            f"| {r.fault.name} | {r.served_share:.2%} ({r.served}/{r.requests}) | "
            f"{percentile(during, 0.5) * 1000:.0f} / {percentile(during, 0.99) * 1000:.0f} ms | "
            f"{percentile(after, 0.99) * 1000:.0f} ms | "
            f"{r.limited_served} of {r.limited_sent} (bound {r.limited_bound}) | "
            f"{ledger} | "
            f"{'pass' if not problems else 'FAIL: ' + '; '.join(problems)} |")
    return "\n".join(lines)


def baseline_p99(rows: Sequence[RowResult]) -> float:
    """The fault-free row's p99 over the whole run (0 when there is none: the floor applies)."""
    for r in rows:
        if r.fault.action == "none":
            return percentile([s.latency for s in r.samples if not s.limited_key], 0.99)
    return 0.0


def describe(row: RowResult) -> str:
    lat = [s.latency for s in row.samples if not s.limited_key]
    return (f"{row.fault.name}: {row.requests} requests, served {row.served_share:.3%}, "
            f"fault {row.fault_start:.1f}-{row.fault_end:.1f} s, "
            f"median {statistics.median(lat) * 1000 if lat else 0:.0f} ms,"
            f" failures {row.failures}, restarts {row.restarts}")


@contextlib.contextmanager
def fault_mesh(data_dir: Path, replicas: int = 2, extra_env: dict[str, str] | None = None) -> Iterator[FaultMesh]:
    fm = FaultMesh.start(data_dir, replicas, extra_env)
    try:
        yield fm
    finally:
        fm.close()


def verdict_single_replica(row: RowResult, bar: Bar = Bar()) -> list[str]:
    """With one inference replica killed: every request answered (cached, or after the restart) or refused
    cleanly within ``p99_during_s`` (HTTP 503 with Retry-After, gRPC UNAVAILABLE); none hangs; ledger exact."""
    problems: list[str] = []
    unclean = [s for s in row.samples if not s.limited_key and not s.served
               and not ((s.outcome == "503" and s.retry_after) or s.outcome == "UNAVAILABLE")]
    if unclean:
        kinds = sorted({s.outcome for s in unclean})
        problems.append(f"{len(unclean)} requests neither served nor a clean 503/UNAVAILABLE ({kinds})")
    slow_refusals = [s for s in row.samples if not s.served and s.latency >= bar.p99_during_s]
    if slow_refusals:
        problems.append(f"{len(slow_refusals)} refusals took {bar.p99_during_s:g} s or more")
    problems += _limit_and_ledger(row)
    return problems
