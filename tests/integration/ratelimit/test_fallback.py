"""The local fallback behind the real service when its Redis is SIGKILLed and restarted from its AOF.

What Redis admitted carries over into the fallback (a key that spent its burst gets no fresh one
when Redis dies), and what the fallback admitted carries back into Redis when it returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_server import GrpcServer
from ops.launcher import LocalRedis
from services.ratelimit.server import build_app
from services.ratelimit.settings import RateLimitSettings
from tests.integration.ratelimit.ratelimit_support import (
    Running,
    reserve_req,
    rpc_error,
    set_limit,
    subject,
    wait_for_limit,
)

TPD = 100_000  # tokens per day: refills about 1.2 tokens a second, so timing hardly matters here
TPD_KIND = ratelimit_pb2.LIMIT_KIND_TOKENS_PER_DAY


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[LocalRedis]:
    """A redis-server of this test's own (append-only file), so that it can be killed."""
    local = LocalRedis(tmp_path / "redis")
    await asyncio.to_thread(local.start)
    client = aioredis.Redis.from_url(local.url)
    try:
        # Every write reaches the AOF before the reply: the kill loses nothing the service was told.
        await client.config_set("appendfsync", "always")
    finally:
        await client.aclose()
    yield local
    await asyncio.to_thread(local.stop)


@pytest.fixture
async def on_private_redis(clean_env: None, control_plane: asyncpg.Pool, database_url: str, redis_prefix: str,
                           private_redis: LocalRedis) -> AsyncIterator[Running]:
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=private_redis.url, redis_prefix=redis_prefix,
                                 database_url=database_url, limits_refresh_s=0.1, sweep_interval_s=0.1,
                                 grace_period_s=1, redis_timeout_s=2.0, redis_retry_s=0.1)
    app = await build_app(settings)
    server = GrpcServer(settings, app.bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(ratelimit_pb2_grpc.RateLimitServiceStub(channel), control_plane, settings, app, server.health,
                      channel)
    finally:
        await channel.close()
        await server.stop(0.5)
        await app.close()


async def tpd_left(svc: Running, key: str) -> tuple[int, bool]:
    usage = await svc.stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject(key)))
    [row] = [u for u in usage.usages if u.kind == TPD_KIND and u.scope_id == key]
    return row.remaining, usage.degraded


async def test_spent_tokens_carry_over_when_redis_is_killed_and_back_when_it_returns(
        on_private_redis: Running, private_redis: LocalRedis) -> None:
    svc = on_private_redis
    for key in ("k1", "k2"):
        await set_limit(svc, "key", key, tpd=TPD)
        await wait_for_limit(svc, key, TPD_KIND, TPD)

    # k1 spends its whole allowance through Redis.
    res = await svc.stub.Reserve(reserve_req(TPD, key="k1"))
    assert not res.degraded
    await svc.stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=res.reservation_id, actual_tokens=TPD))

    proc = private_redis.proc
    assert proc is not None
    proc.kill()
    await asyncio.to_thread(proc.wait)

    # The fallback goes on from what Redis had left, not from a full bucket.
    err, _ = await rpc_error(svc.stub.Reserve(reserve_req(1_000, key="k1")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    left, degraded = await tpd_left(svc, "k1")
    assert degraded and left < 1_000

    # k2, never seen before, is admitted by the fallback alone (it starts full, as documented).
    local = await svc.stub.Reserve(reserve_req(60_000, key="k2"))
    assert local.degraded
    await svc.stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=local.reservation_id, actual_tokens=60_000))

    private_redis.restart()
    deadline = time.monotonic() + 15
    while True:  # the first reserve that reaches Redis writes the fallback's admissions back first
        probe = await svc.stub.Reserve(reserve_req(1, key="k2"))
        if not probe.degraded:
            break
        assert time.monotonic() < deadline, "the service did not go back to Redis"
        await asyncio.sleep(0.1)

    left, degraded = await tpd_left(svc, "k2")
    assert not degraded and TPD - 60_000 - 100 <= left <= TPD - 60_000 + 10, left
    err, _ = await rpc_error(svc.stub.Reserve(reserve_req(50_000, key="k2")))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # refused by Redis, which knows of the 60,000
    left_k1, degraded = await tpd_left(svc, "k1")
    assert not degraded and left_k1 < 1_000  # Redis kept k1's level through the kill (AOF)
    await asyncio.sleep(0.5)  # several sweeps: the write-back is not repeated
    assert (await tpd_left(svc, "k2"))[0] >= left - 10
