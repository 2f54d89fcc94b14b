"""Budgets, advice, alerts, reconciliation, idempotency and health through real gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_server import GrpcServer
from services.ratelimit.budgets import window_at
from services.ratelimit.limits import Period
from services.ratelimit.server import REDIS_HEALTH, build_app
from services.ratelimit.settings import RateLimitSettings
from tests.integration.ratelimit.ratelimit_support import (
    Running,
    detail,
    reserve_req,
    rpc_error,
    set_budget,
    subject,
)
from tests.support.infra import free_port

DAILY = ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD
MONTHLY = ratelimit_pb2.LIMIT_KIND_BUDGET_MONTHLY_NANO_USD


async def budget_rows(svc: Running, key: str = "k1") -> dict[tuple[int, int], ratelimit_pb2.LimitUsage]:
    usage = await svc.stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject(key)))
    return {(u.scope, u.kind): u for u in usage.usages if u.kind in (DAILY, MONTHLY)}


async def wait_for_budget(svc: Running, scope: int, kind: int, limit: int, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        row = (await budget_rows(svc)).get((scope, kind))
        if row is not None and row.limit == limit:
            return
        assert time.monotonic() < deadline, f"budget {limit} not picked up within {timeout_s}s"
        await asyncio.sleep(0.05)


async def spend(svc: Running, amount: int) -> None:
    res = await svc.stub.Reserve(reserve_req(10, cost=amount))
    await svc.stub.Commit(ratelimit_pb2.CommitRequest(reservation_id=res.reservation_id, actual_tokens=10,
                                                      actual_cost_nano_usd=amount))


async def test_exhausted_budget_is_resource_exhausted_naming_level_with_time_to_reset(ratelimit: Running) -> None:
    await set_budget(ratelimit, "team", "t1", daily=1_000_000, monthly=50_000_000)
    await wait_for_budget(ratelimit, common_pb2.LIMIT_SCOPE_TEAM, DAILY, 1_000_000)
    await spend(ratelimit, 1_000_000)
    err, status = await rpc_error(ratelimit.stub.Reserve(reserve_req(10, cost=1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = detail(status, error_details_pb2.ErrorInfo)
    assert info.reason == "BUDGET_EXHAUSTED" and info.metadata["budgets"] == "team:t1 daily budget"
    [violation] = detail(status, error_details_pb2.QuotaFailure).violations
    assert violation.subject == "team:t1"
    assert violation.description.startswith("daily budget of 1000000 nano-USD exhausted: 1000000 used (UTC day ")
    retry = detail(status, error_details_pb2.RetryInfo).retry_delay
    now = time.time()
    midnight = window_at(Period.DAILY, int(now * 1000)).end_ms / 1000
    assert abs(retry.seconds + retry.nanos / 1e9 - (midnight - now)) < 5
    assert "budget exhausted: team:t1 daily budget" in (err.details() or "")


async def test_usage_rows_advice_and_alert_events(ratelimit: Running, redis_url: str) -> None:
    await set_budget(ratelimit, "org", "o1", daily=0, monthly=10_000)
    await wait_for_budget(ratelimit, common_pb2.LIMIT_SCOPE_ORG, MONTHLY, 10_000)
    held = await ratelimit.stub.Reserve(reserve_req(10, cost=2_000))
    assert held.advice == ratelimit_pb2.BUDGET_ADVICE_NONE
    await spend(ratelimit, 7_500)  # 9,500 in use with the hold: 95 %
    row = (await budget_rows(ratelimit))[(common_pb2.LIMIT_SCOPE_ORG, MONTHLY)]
    assert (row.scope_id, row.limit, row.used, row.reserved, row.remaining) == ("o1", 10_000, 9_500, 2_000, 500)
    window = window_at(Period.MONTHLY, int(time.time() * 1000))
    assert row.window_start.ToMilliseconds() == window.start_ms and row.resets_at.ToMilliseconds() == window.end_ms
    near = await ratelimit.stub.Reserve(reserve_req(10, cost=0))
    assert near.advice == ratelimit_pb2.BUDGET_ADVICE_PREFER_CHEAPER
    await ratelimit.stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id=near.reservation_id))
    await ratelimit.stub.Release(ratelimit_pb2.ReleaseRequest(reservation_id=held.reservation_id))

    client = aioredis.Redis.from_url(redis_url)
    try:
        events = await client.xrange(f"{ratelimit.settings.redis_prefix}budget_alerts")
    finally:
        await client.aclose()
    # Committed spend 7,500 = 75 %: no alert yet (holds do not alert). 8,000 will.
    assert events == []
    await spend(ratelimit, 500)
    client = aioredis.Redis.from_url(redis_url)
    try:
        events = await client.xrange(f"{ratelimit.settings.redis_prefix}budget_alerts")
    finally:
        await client.aclose()
    assert [(e[b"scope"], e[b"scope_id"], e[b"period"], e[b"threshold_pct"]) for _, e in events] == [
        (b"org", b"o1", b"monthly", b"80")]


async def test_budget_changes_are_picked_up_within_seconds(ratelimit: Running) -> None:
    await ratelimit.stub.Reserve(reserve_req(10, cost=5_000))  # no budget yet
    await set_budget(ratelimit, "key", "k1", daily=1_000)
    deadline = time.monotonic() + 3
    while True:
        try:
            await ratelimit.stub.Reserve(reserve_req(10, cost=2_000))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            break
        assert time.monotonic() < deadline, "new budget not enforced within 3 s"
        await asyncio.sleep(0.05)
    await set_budget(ratelimit, "key", "k1", daily=10_000)
    deadline = time.monotonic() + 3
    while True:
        try:
            await ratelimit.stub.Reserve(reserve_req(10, cost=2_000))
            break
        except grpc.aio.AioRpcError:
            assert time.monotonic() < deadline, "raised budget not picked up within 3 s"
            await asyncio.sleep(0.05)


async def test_retried_reserve_returns_the_same_reservation(ratelimit: Running) -> None:
    await set_budget(ratelimit, "key", "k1", daily=1_000)
    await wait_for_budget(ratelimit, common_pb2.LIMIT_SCOPE_KEY, DAILY, 1_000)
    first = await ratelimit.stub.Reserve(reserve_req(10, request_id="req-7", cost=600))
    again = await ratelimit.stub.Reserve(reserve_req(10, request_id="req-7", cost=600))
    assert (again.reservation_id, again.expires_at, again.replayed) == (first.reservation_id, first.expires_at, True)
    assert (await budget_rows(ratelimit))[(common_pb2.LIMIT_SCOPE_KEY, DAILY)].used == 600


async def test_reconcile_spend(ratelimit: Running) -> None:
    await set_budget(ratelimit, "team", "t1", daily=10_000)
    await wait_for_budget(ratelimit, common_pb2.LIMIT_SCOPE_TEAM, DAILY, 10_000)
    await spend(ratelimit, 1_000)
    now = timestamp_pb2.Timestamp()
    now.FromDatetime(datetime.now(UTC))
    req = ratelimit_pb2.ReconcileSpendRequest(scope=common_pb2.LIMIT_SCOPE_TEAM, scope_id="t1", kind=DAILY,
                                              window_time=now, ledger_spent_nano_usd=2_500)
    resp = await ratelimit.stub.ReconcileSpend(req)
    assert (resp.previous_spent_nano_usd, resp.spent_nano_usd, resp.reserved_nano_usd) == (1_000, 2_500, 0)
    window = window_at(Period.DAILY, int(time.time() * 1000))
    assert resp.window_start.ToMilliseconds() == window.start_ms
    assert (await budget_rows(ratelimit))[(common_pb2.LIMIT_SCOPE_TEAM, DAILY)].used == 2_500

    bad = ratelimit_pb2.ReconcileSpendRequest(scope=common_pb2.LIMIT_SCOPE_CLIENT_IP,
                                              kind=ratelimit_pb2.LIMIT_KIND_TOKENS_PER_MINUTE,
                                              ledger_spent_nano_usd=-1)
    err, status = await rpc_error(ratelimit.stub.ReconcileSpend(bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in detail(status, error_details_pb2.BadRequest).field_violations}
    assert fields == {"scope", "kind", "window_time", "ledger_spent_nano_usd"}


async def test_health_reports_redis_serving(ratelimit: Running) -> None:
    stub = health_pb2_grpc.HealthStub(ratelimit.channel)
    for service in ("", "tollgate.ratelimit.v1.RateLimitService", REDIS_HEALTH):
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, service


@pytest.fixture
async def without_redis(clean_env: None, control_plane: asyncpg.Pool, database_url: str) -> AsyncIterator[
        grpc.aio.Channel]:
    """The service with Redis unreachable from the start (nothing listens on its port)."""
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                                 database_url=database_url, limits_refresh_s=0.1, sweep_interval_s=0.1,
                                 grace_period_s=1, redis_timeout_s=0.2, replicas=2)
    app = await build_app(settings)
    server = GrpcServer(settings, app.bindings)
    port = await server.start()
    await app.watch_health(server.health)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0.5)
        await app.close()


async def test_redis_down_is_degraded_but_serving(without_redis: grpc.aio.Channel,
                                                  control_plane: asyncpg.Pool) -> None:
    await set_budget(control_plane, "key", "k1", daily=1_000)
    stub = ratelimit_pb2_grpc.RateLimitServiceStub(without_redis)
    health_stub = health_pb2_grpc.HealthStub(without_redis)
    deadline = time.monotonic() + 5
    while True:  # budgets arrive from PostgreSQL; the local share is 1,000 // 2
        res = await stub.Reserve(reserve_req(10, cost=400))
        assert res.degraded and res.reservation_id.startswith("local-")
        usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject()))
        if usage.usages:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert usage.degraded
    _, status = await rpc_error(stub.Reserve(reserve_req(10, cost=400)))
    assert detail(status, error_details_pb2.ErrorInfo).reason == "BUDGET_EXHAUSTED"
    assert "rate limit store is unavailable" in detail(status, error_details_pb2.QuotaFailure).violations[0].description
    deadline = time.monotonic() + 3
    while (await health_stub.Check(health_pb2.HealthCheckRequest(service=REDIS_HEALTH))).status != \
            health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "redis health entry never reported NOT_SERVING"
        await asyncio.sleep(0.05)
    # The service itself still serves (from the fallback): load balancers must keep it.
    assert (await health_stub.Check(health_pb2.HealthCheckRequest(service=""))).status == \
        health_pb2.HealthCheckResponse.SERVING
