"""Reconciliation against the real ratelimit service and the router's AdminService (both in-process, real
gRPC, Redis and PostgreSQL; read as ``tollgate reconcile`` reads them): budgets set through the control
plane, spend committed through Reserve/Commit, the ledger written beside it; then the books are compared,
a lost ledger event shows up, and --fix repairs a counter."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import grpc
import pytest
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_server import GrpcServer
from ops.admin_cli import AdminApi, RateLimitCounters
from ops.reconcile import reconcile
from services.ratelimit.server import build
from services.ratelimit.settings import RateLimitSettings
from services.router.control.plane import ControlPlane
from tests.integration.ops.conftest import RouterAdmin

ORG, TEAM = "org_r", "team_r"


@dataclass
class Books:
    control: ControlPlane
    ledger: AdminApi  # the router's AdminService
    pool: asyncpg.Pool
    limiter: ratelimit_pb2_grpc.RateLimitServiceStub
    counters: RateLimitCounters
    keys: list[str]


@pytest.fixture
async def books(router_admin: RouterAdmin, database_url: str, redis_url: str,
                redis_prefix: str) -> AsyncIterator[Books]:
    pool, control = router_admin.pool, router_admin.control
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO orgs (org_id, name) VALUES ($1, 'r')", ORG)
        await conn.execute("INSERT INTO teams (team_id, org_id, name) VALUES ($1, $2, 'r')", TEAM, ORG)
    keys = []
    for name in ("a", "b"):
        created = await control.create_key("t", org_id=ORG, team_id=TEAM, name=name, role="member",
                                           allowed_models=[], expires_at=None)
        keys.append(created.key_id)
        await control.set_budget("t", "key", created.key_id, 10**12, 10**13)
    await control.set_budget("t", "team", TEAM, 10**12, 10**13)
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=redis_url, redis_prefix=redis_prefix,
                                 database_url=database_url, limits_refresh_s=0.1, sweep_interval_s=0.1)
    bindings, close = await build(settings)
    server = GrpcServer(settings, bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Books(control, router_admin.api, pool, ratelimit_pb2_grpc.RateLimitServiceStub(channel),
                    RateLimitCounters(channel), keys)
    finally:
        await channel.close()
        await server.stop(0)
        await close()


def _principal(key: str) -> common_pb2.Principal:
    return common_pb2.Principal(org_id=ORG, team_id=TEAM, key_id=key)


async def _spend(b: Books, key: str, cost: int, *, in_ledger: bool = True, settle: bool = True) -> None:
    """One request: reserved and committed at the limiter, and (unless lost) written to the ledger."""
    request_id = f"req-{time.monotonic_ns()}"
    r = await b.limiter.Reserve(ratelimit_pb2.ReserveRequest(
        subject=ratelimit_pb2.Subject(principal=_principal(key)), request_id=request_id, estimated_tokens=100,
        estimated_cost_nano_usd=cost * 2))
    if settle:
        await b.limiter.Commit(ratelimit_pb2.CommitRequest(reservation_id=r.reservation_id, actual_tokens=50,
                                                           actual_cost_nano_usd=cost))
    if in_ledger:
        now = datetime.now(UTC)
        async with b.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, "
                "provider, input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, "
                "cache_tier, status, latency_ms) VALUES ($1, $2, $2, $3, $4, $5, 'm', 'p', 10, 40, 0, $6, 0, "
                "'miss', 'ok', 1)", request_id, now, ORG, TEAM, key, cost)


async def _budget_counters_ready(b: Books) -> None:
    deadline = time.monotonic() + 5
    while True:
        resp = await b.limiter.GetUsage(ratelimit_pb2.GetUsageRequest(
            subject=ratelimit_pb2.Subject(principal=_principal(b.keys[0]))))
        kinds = {u.kind for u in resp.usages}
        if ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD in kinds:
            return
        if time.monotonic() > deadline:
            pytest.fail("the ratelimit service reports no budget rows in GetUsage")
        await asyncio.sleep(0.1)


async def test_books_that_agree_and_a_lost_ledger_event(books: Books) -> None:
    await _budget_counters_ready(books)
    a, b = books.keys
    for key, cost in ((a, 1_000_000), (a, 2_500_000), (b, 7_000)):
        await _spend(books, key, cost)
    await _spend(books, b, 999, settle=False, in_ledger=False)  # in flight: reserved, neither spend nor ledger
    result = await reconcile(books.ledger, books.counters)
    assert result.differences == [], result.render_text()
    compared = {(ln.scope, ln.scope_id, ln.period): ln for ln in result.lines if ln.counter_nano_usd is not None}
    assert compared[("key", a, "day")].counter_nano_usd == 3_500_000
    assert compared[("team", TEAM, "month")].ledger_nano_usd == 3_507_000
    assert compared[("key", b, "day")].reserved_nano_usd > 0  # shown apart, not counted as a difference

    # A request the limiter charged but whose usage event never reached the ledger.
    await _spend(books, b, 40_000, in_ledger=False)
    result = await reconcile(books.ledger, books.counters, tolerance_nano_usd=100)
    diffs = {(d.scope, d.scope_id, d.period): d.difference_nano_usd for d in result.differences}
    assert diffs == {("key", b, "day"): 40_000, ("key", b, "month"): 40_000,
                     ("team", TEAM, "day"): 40_000, ("team", TEAM, "month"): 40_000}


async def test_fix_raises_a_counter_that_missed_spend(books: Books) -> None:
    await _budget_counters_ready(books)
    a, _ = books.keys
    await _spend(books, a, 5_000)
    # Spend the ledger has and the limiter never saw (a commit that was lost, say).
    now = datetime.now(UTC)
    async with books.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider, "
            "input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, cache_tier, status, "
            "latency_ms) VALUES ('lost-commit', $1, $1, $2, $3, $4, 'm', 'p', 1, 1, 0, 20000, 0, 'miss', 'ok', 1)",
            now, ORG, TEAM, a)
    before = await reconcile(books.ledger, books.counters, fix=True)
    assert {(d.scope, d.period) for d in before.differences} == {("key", "day"), ("key", "month"),
                                                                ("team", "day"), ("team", "month")}
    assert all(d.fixed_to_nano_usd == d.ledger_nano_usd for d in before.differences)
    after = await reconcile(books.ledger, books.counters)
    assert after.differences == [], after.render_text()
