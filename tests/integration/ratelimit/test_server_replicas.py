"""Limits and budgets hold under concurrency across two real ratelimit processes.

64 concurrent clients, spread over two `python -m services.ratelimit` processes sharing one
Redis, reserve, "generate" for a moment, and commit their actual usage (never more than the
estimate, as the router's estimate is input + max output tokens). What was consumed must stay
within the limit, the refill over the run, and one request's maximum. A limiter counting in
process memory would let each process admit the whole limit (about twice the bound); the
Redis-down test checks the documented local bound the same way.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_errors import status_proto_from_rpc
from tests.integration.ratelimit.ratelimit_support import reserve_req, set_budget, set_limit, subject
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow

CLIENTS = 64
TPM = 10_000
MAX_REQUEST = 1_000  # tokens: the largest estimate any client sends
RUN_S = 3.0


@dataclass
class Tally:
    admitted: int = 0
    rejected: int = 0
    consumed_tokens: int = 0
    spent_nano_usd: int = 0
    degraded: int = 0
    per_process: list[int] = field(default_factory=lambda: [0, 0])
    first_reserve: float = 0.0
    last_reserve: float = 0.0


def retry_after(err: grpc.aio.AioRpcError) -> float:
    status = status_proto_from_rpc(err)
    for d in status.details if status else ():
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 0.05


async def drive(addresses: list[str], *, min_tokens: int, max_tokens: int, min_cost: int = 0,
                max_cost: int = 0, seed: int = 5) -> Tally:
    """CLIENTS concurrent clients for RUN_S seconds, client i through process i % 2."""
    tally = Tally()
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [ratelimit_pb2_grpc.RateLimitServiceStub(ch) for ch in channels]
    start = time.monotonic()
    tally.first_reserve = start
    stop_at = start + RUN_S

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        stub = stubs[i % len(stubs)]
        while time.monotonic() < stop_at:
            tokens = rng.randint(min_tokens, max_tokens)
            cost = rng.randint(min_cost, max_cost)
            try:
                res = await stub.Reserve(reserve_req(tokens, cost=cost), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                tally.rejected += 1
                tally.last_reserve = time.monotonic()
                await asyncio.sleep(min(retry_after(exc), 0.05) + rng.random() * 0.02)
                continue
            tally.last_reserve = time.monotonic()
            tally.admitted += 1
            tally.per_process[i % len(stubs)] += 1
            tally.degraded += res.degraded
            await asyncio.sleep(rng.random() * 0.03)  # generating
            actual, actual_cost = rng.randint(tokens // 2, tokens), rng.randint(cost // 2, cost)
            await stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=res.reservation_id, actual_tokens=actual,
                                                          actual_cost_nano_usd=actual_cost), timeout=10)
            tally.consumed_tokens += actual
            tally.spent_nano_usd += actual_cost

    try:
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))
    finally:
        for ch in channels:
            await ch.close()
    return tally


def start_processes(tmp_path: Path, env: dict[str, str], n: int = 2) -> list[ServiceProcess]:
    procs = []
    try:
        for i in range(n):
            port = free_port()
            log_dir = tmp_path / f"p{i}"
            log_dir.mkdir()
            procs.append(ServiceProcess("ratelimit", port, {**env, "TOLLGATE_RATELIMIT_PORT": str(port)}, log_dir))
        for p in procs:
            p.wait_ready()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


@pytest.fixture
def processes(tmp_path: Path, clean_env: None) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        assert p.stop() == 0, p.log()[-3000:]
        assert "Traceback" not in p.log(), p.log()[-3000:]


async def wait_until_loaded(addresses: list[str], kind: int, limit: int) -> None:
    for address in addresses:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = ratelimit_pb2_grpc.RateLimitServiceStub(ch)
            deadline = time.monotonic() + 10
            while True:
                usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject()), timeout=5)
                if any(u.kind == kind and u.limit == limit for u in usage.usages):
                    break
                assert time.monotonic() < deadline, f"{address} did not load the limits"
                await asyncio.sleep(0.1)


def env_for(redis_url: str, redis_prefix: str, database_url: str, **extra: str) -> dict[str, str]:
    return {"TOLLGATE_REDIS_URL": redis_url, "TOLLGATE_REDIS_PREFIX": redis_prefix,
            "TOLLGATE_DATABASE_URL": database_url, "TOLLGATE_RATELIMIT_LIMITS_REFRESH_S": "0.2",
            # Generous: two cores shared with the clients; a slow call must not look like Redis down.
            "TOLLGATE_RATELIMIT_REDIS_TIMEOUT_S": "2", "TOLLGATE_LOG_LEVEL": "WARNING", **extra}


async def test_tpm_limit_holds_across_two_processes(control_plane: asyncpg.Pool, database_url: str, redis_url: str,
                                                    redis_prefix: str, tmp_path: Path,
                                                    processes: list[ServiceProcess]) -> None:
    await set_limit(control_plane, "key", "k1", tpm=TPM)
    processes += start_processes(tmp_path, env_for(redis_url, redis_prefix, database_url))
    addresses = [p.address for p in processes]
    await wait_until_loaded(addresses, ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, TPM)

    tally = await drive(addresses, min_tokens=200, max_tokens=MAX_REQUEST)

    elapsed = tally.last_reserve - tally.first_reserve
    refill = TPM * elapsed / 60
    bound = TPM + refill + MAX_REQUEST
    summary = f"consumed {tally.consumed_tokens}, bound {bound:.0f}, {tally}"
    assert tally.consumed_tokens <= bound, summary
    # The clients really pushed against the limit, through both processes, on Redis.
    assert tally.consumed_tokens >= 0.9 * TPM and tally.rejected > 0, summary
    assert min(tally.per_process) > 0 and tally.degraded == 0, summary


async def test_budget_holds_across_two_processes_and_usage_is_exact(
        control_plane: asyncpg.Pool, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path,
        processes: list[ServiceProcess]) -> None:
    budget = 2_000_000
    await set_budget(control_plane, "team", "t1", daily=budget)
    processes += start_processes(tmp_path, env_for(redis_url, redis_prefix, database_url))
    addresses = [p.address for p in processes]
    await wait_until_loaded(addresses, ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD, budget)

    tally = await drive(addresses, min_tokens=10, max_tokens=100, min_cost=10_000, max_cost=60_000)

    summary = f"spent {tally.spent_nano_usd} of {budget}, {tally}"
    # Estimates are held until commit and actual <= estimate: the budget is never exceeded at all.
    assert tally.spent_nano_usd <= budget, summary
    assert tally.spent_nano_usd >= budget - 2 * 60_000 and tally.rejected > 0, summary
    # What GetUsage reports is exactly what was committed (the ledger's figure), nothing held.
    async with grpc.aio.insecure_channel(addresses[1]) as ch:
        usage = await ratelimit_pb2_grpc.RateLimitServiceStub(ch).GetUsage(
            ratelimit_pb2.GetUsageRequest(subject=subject()), timeout=5)
    [row] = [u for u in usage.usages if u.kind == ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD]
    assert (row.used, row.reserved, row.remaining) == (tally.spent_nano_usd, 0, budget - tally.spent_nano_usd)


async def test_redis_down_two_processes_stay_within_the_documented_local_bound(
        control_plane: asyncpg.Pool, database_url: str, tmp_path: Path, processes: list[ServiceProcess]) -> None:
    await set_limit(control_plane, "key", "k1", tpm=TPM)
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    processes += start_processes(tmp_path, env_for(dead_redis, "tg:", database_url,
                                                   TOLLGATE_RATELIMIT_REPLICAS="2",
                                                   TOLLGATE_RATELIMIT_REDIS_TIMEOUT_S="0.2"))
    addresses = [p.address for p in processes]
    await wait_until_loaded(addresses, ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE, TPM // 2)

    tally = await drive(addresses, min_tokens=200, max_tokens=MAX_REQUEST)

    # Documented: each of R replicas enforces limit // R locally (buckets start full).
    elapsed = tally.last_reserve - tally.first_reserve
    bound = 2 * (TPM // 2) + TPM * elapsed / 60 + MAX_REQUEST
    summary = f"consumed {tally.consumed_tokens}, bound {bound:.0f}, {tally}"
    assert tally.degraded == tally.admitted > 0, summary
    assert tally.consumed_tokens <= bound, summary
    assert tally.consumed_tokens >= 0.9 * TPM and min(tally.per_process) > 0, summary
