"""Versioned pricing end to end: prices set through the control plane, loaded by the registry, applied
by the gateway, carried through the real Redis Stream into the real PostgreSQL ledger.

The downstream services (cache, limiter, inference) are small in-memory stand-ins here: what is
under test is which price a request gets and what the ledger records, not those services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from libs.chat import ChatMessage, FinishReason, GenerationChunk, GenerationParams, Principal, Role, TokenUsage
from libs.deadlines import Deadline
from services.router.control.bootstrap import apply_migrations
from services.router.control.keys import KeyRecord
from services.router.control.plane import ControlPlane
from services.router.control.pricing import Price
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import LedgerWriter
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.ports import CachedAnswer, CacheNamespace, Reservation
from services.router.pipeline.request import GenerateCommand, Summary

KEY = KeyRecord("key_1", Principal("org_1", "team_1", "key_1"), "member", (), None, False)
# v1: $0.15 / $0.60 / $0.075 per M; v2 doubles everything.
V1 = dict(input_per_mtok=150_000_000, output_per_mtok=600_000_000, cached_input_per_mtok=75_000_000)
V2 = {k: 2 * v for k, v in V1.items()}
USAGE = TokenUsage(input_tokens=1_000, output_tokens=500, cached_input_tokens=400)


class Cache:
    def __init__(self) -> None:
        self.hit: CachedAnswer | None = None

    async def lookup(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                     *, max_age_s: int, allow_stale: bool, exact_only: bool, deadline: Deadline,
                     price: Price | None = None) -> CachedAnswer | None:
        return self.hit

    async def store(self, *args: object) -> None:
        return None


class Limiter:
    def __init__(self) -> None:
        self.reserve_delay_s = 0.0
        self.committed: dict[str, int] = {}

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        await asyncio.sleep(self.reserve_delay_s)
        return Reservation(request_id, False, False)

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        self.committed[reservation_id] = actual_cost_nano_usd

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        return None


class Inference:
    def __init__(self) -> None:
        self.endless = False

    def order(self, targets: Sequence[str]) -> list[str]:
        return list(targets)

    def cool_down(self, target: str, seconds: float) -> None:
        return None

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        return None

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        while self.endless:
            yield GenerationChunk(delta="word ")
            await asyncio.sleep(0.005)
        yield GenerationChunk(delta="answer")
        yield GenerationChunk(usage=USAGE, finish_reason=FinishReason.STOP, model=model, provider="fake")


@dataclass
class World:
    control: ControlPlane
    registry: Registry
    gateway: Gateway
    cache: Cache
    limiter: Limiter
    inference: Inference
    writer: LedgerWriter
    pool: asyncpg.Pool

    async def ledger(self) -> dict[str, asyncpg.Record]:
        await self.gateway.aclose()
        while await self.writer.drain_once(block_ms=50):
            pass
        async with self.pool.acquire() as conn:
            return {r["request_id"]: r for r in await conn.fetch("SELECT * FROM usage_ledger")}


@pytest.fixture
async def world(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> AsyncIterator[World]:
    await apply_migrations(database_url)
    pool = await create_pool(database_url)
    client = redis.Redis.from_url(redis_url)
    control = ControlPlane(pool)
    await control.register_model("admin", name="m", provider="fake", inference_target="t:1", context_window=8192,
                                 cost_tier="cheap")
    registry = Registry(pool, 60)
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=50)
    await writer.ensure_group()
    cache, limiter, inference = Cache(), Limiter(), Inference()
    gateway = Gateway(registry=registry, cache=cache, ratelimit=limiter, inference=inference,
                      usage=UsageRecorder(client, stream, tmp_path), default_max_output_tokens=100,
                      side_call_timeout_s=5)
    yield World(control, registry, gateway, cache, limiter, inference, writer, pool)
    await client.aclose()
    await pool.close()


def _cmd() -> GenerateCommand:
    return GenerateCommand(model="m", messages=[ChatMessage(Role.USER, "hello")],
                           params=GenerationParams(temperature=0.0, max_output_tokens=100))


async def _generate(w: World) -> Summary:
    summary = None
    async for event in w.gateway.generate(KEY, _cmd(), Deadline.after(10)):
        if isinstance(event, Summary):
            summary = event
    assert summary is not None
    return summary


async def _two_versions(w: World, change_in_s: float) -> tuple[int, int, datetime]:
    v1 = await w.control.set_price("admin", model="m", effective_from=None, **V1)
    change_at = datetime.now(UTC) + timedelta(seconds=change_in_s)
    v2 = await w.control.set_price("admin", model="m", effective_from=change_at, **V2)
    await w.registry.load()  # both versions, loaded once: pricing a request is a lookup, not a query
    return v1, v2, change_at


async def _sleep_until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - datetime.now(UTC)).total_seconds()) + 0.05)


def _cost(prices: dict[str, int], usage: TokenUsage = USAGE) -> int:
    return Price(0, "m", effective_from=datetime.now(UTC), **prices).cost(usage)


def test_the_expected_costs_by_hand() -> None:
    # 600 fresh input at $0.15/M + 400 cached at $0.075/M + 500 output at $0.60/M, in nano-USD:
    # 90,000 + 30,000 + 300,000. The cached tokens are billed once, at the cached rate.
    assert _cost(V1) == 420_000
    assert _cost(V2) == 840_000


async def test_requests_before_and_after_a_price_change_get_their_own_version(world: World) -> None:
    v1, v2, change_at = await _two_versions(world, change_in_s=1.0)
    before = await _generate(world)
    await _sleep_until(change_at)
    after = await _generate(world)
    assert (before.price_version, before.cost_nano_usd) == (v1, 420_000)
    assert (after.price_version, after.cost_nano_usd) == (v2, 840_000)
    ledger = await world.ledger()
    assert (ledger[before.request_id]["price_version"], ledger[before.request_id]["cost_nano_usd"]) == (v1, 420_000)
    assert (ledger[after.request_id]["price_version"], ledger[after.request_id]["cost_nano_usd"]) == (v2, 840_000)
    assert ledger[before.request_id]["cached_input_tokens"] == 400
    # The change did not re-price the earlier row (and could not: see the append-only triggers).
    [v1_row] = [p for p in await world.control.list_prices("m") if p.price_version == v1]
    assert v1_row.input_per_mtok == V1["input_per_mtok"]
    assert world.limiter.committed[before.request_id] == 420_000  # the budget was charged the same amount


async def test_a_request_that_straddles_a_price_change_keeps_the_price_it_started_with(world: World) -> None:
    v1, _, change_at = await _two_versions(world, change_in_s=0.3)
    world.limiter.reserve_delay_s = 0.6  # the request starts before the change and generates after it
    summary = await _generate(world)
    assert datetime.now(UTC) > change_at
    ledger = await world.ledger()
    row = ledger[summary.request_id]
    assert row["started_at"] < change_at
    assert (row["price_version"], row["cost_nano_usd"]) == (v1, 420_000)


async def test_cache_hit_costs_nothing_and_records_what_it_saved_at_the_current_price(world: World) -> None:
    v1, _, _ = await _two_versions(world, change_in_s=3600)
    world.cache.hit = CachedAnswer("cached answer", USAGE, "m", "exact", False)
    summary = await _generate(world)
    row = (await world.ledger())[summary.request_id]
    assert (row["cost_nano_usd"], row["saved_nano_usd"], row["cache_tier"]) == (0, 420_000, "exact")
    assert row["price_version"] == v1


async def test_a_cancelled_stream_is_billed_in_the_ledger_for_what_was_generated(world: World) -> None:
    v1, _, _ = await _two_versions(world, change_in_s=3600)
    world.inference.endless = True
    events = world.gateway.generate(KEY, _cmd(), Deadline.after(10))
    for _ in range(20):
        await events.__anext__()
    await events.aclose()  # what grpc.aio does when the client goes away
    ledger = await world.ledger()
    [row] = ledger.values()
    assert row["status"] == "cancelled" and row["output_tokens"] > 0 and row["cost_nano_usd"] > 0
    assert row["price_version"] == v1
    expected = _cost(V1, TokenUsage(row["input_tokens"], row["output_tokens"], 0))
    assert row["cost_nano_usd"] == expected
    [total] = await world.control.usage_report(row["started_at"] - timedelta(seconds=1),
                                               row["started_at"] + timedelta(seconds=1), [])
    assert total.cancelled == 1 and total.cost_nano_usd == expected
