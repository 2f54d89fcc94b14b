"""Usage events through a real Redis Stream into a real PostgreSQL ledger: exactly once."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from services.router.db import create_pool
from services.router.ledger.events import UsageEvent
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import LedgerWriter
from tests.support.usage import usage_event


def _event(request_id: str, cost: int = 100) -> UsageEvent:
    return usage_event(request_id, cost_nano_usd=cost, latency_ms=12, labels={"team": "search"})


async def _ledger(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT request_id, cost_nano_usd, labels FROM usage_ledger ORDER BY request_id")


async def test_events_land_once_even_when_recorded_twice(pool: asyncpg.Pool, client: redis.Redis,
                                                         redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    writer = LedgerWriter(client, pool, stream, consumer="w1", block_ms=50)
    await writer.ensure_group()
    for rid in ("r1", "r2", "r1"):  # a duplicate delivery of r1
        await recorder.record(_event(rid))
    assert await writer.drain_once() == 3
    rows = await _ledger(pool)
    assert [r["request_id"] for r in rows] == ["r1", "r2"]
    assert await client.xlen(stream) == 0  # acknowledged and trimmed


async def test_unacknowledged_entries_are_redelivered_after_a_crash(pool: asyncpg.Pool, client: redis.Redis,
                                                                    redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    crashed = LedgerWriter(client, pool, stream, consumer="crashed", block_ms=50)
    await crashed.ensure_group()
    await recorder.record(_event("r1"))
    # The crashed writer read the entry but died before inserting and acknowledging it.
    await client.xreadgroup("ledger", "crashed", {stream: ">"}, count=10)
    successor = LedgerWriter(client, pool, stream, consumer="next", block_ms=50, claim_idle_ms=0)
    assert await successor.drain_once() == 1
    assert [r["request_id"] for r in await _ledger(pool)] == ["r1"]


async def test_postgres_down_keeps_events_pending_until_it_returns(pool: asyncpg.Pool, client: redis.Redis,
                                                                   redis_prefix: str, tmp_path: Path,
                                                                   database_url: str) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    dead_pool = await create_pool(database_url)
    await dead_pool.close()  # every acquire now fails, like an unreachable database
    writer = LedgerWriter(client, dead_pool, stream, consumer="w", block_ms=50)
    await writer.ensure_group()
    await recorder.record(_event("r1"))
    with pytest.raises(asyncpg.InterfaceError):
        await writer.drain_once()
    assert await client.xlen(stream) == 1  # nothing lost, nothing acknowledged
    healthy = LedgerWriter(client, pool, stream, consumer="w", block_ms=50)
    assert await healthy.drain_once() == 1
    assert [r["request_id"] for r in await _ledger(pool)] == ["r1"]


async def test_redis_down_spools_locally_and_replays(pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str,
                                                     tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    spooling = UsageRecorder(down, stream, tmp_path)
    await spooling.record(_event("r1"))
    await spooling.record(_event("r2"))
    await down.aclose()
    assert spooling.spool_path.read_text().count("\n") == 2
    recovered = UsageRecorder(client, stream, tmp_path)
    assert await recovered.replay_spool() == 2
    assert not list(tmp_path.glob("usage-spool-*"))
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=50)
    await writer.ensure_group()
    await writer.drain_once()
    assert [r["request_id"] for r in await _ledger(pool)] == ["r1", "r2"]
