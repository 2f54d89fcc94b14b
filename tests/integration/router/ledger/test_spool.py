"""The local usage spool (Redis down) against real Redis and PostgreSQL: every spooled event reaches the
stream exactly once and the ledger exactly once, whatever a replay races with.

What "exactly once" means at each layer (issue 14):
- spool file -> stream: a spooled line is XADDed once. The spool file is rotated (renamed under a
  directory lock) before it is read, so a line written during a replay goes to a fresh file; each chunk's
  XADDs and a progress marker are one MULTI/EXEC, so a replay that dies between XADD and unlink resumes
  after what it already delivered instead of adding it again.
- stream -> ledger: rows are keyed by request id (``ON CONFLICT DO NOTHING``), so even an event that is
  in the stream twice (a lost progress marker, or an XADD whose reply was lost and that was spooled too)
  is one ledger row.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis

from services.router.ledger.events import UsageEvent
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import LedgerWriter
from tests.support.usage import usage_event

ROOT = Path(__file__).resolve().parents[4]
DOWN_URL = "redis://127.0.0.1:1/0"  # nothing listens: every XADD fails at once and the event is spooled


def _event(request_id: str, cost: int = 1_000) -> UsageEvent:
    return usage_event(request_id, cost_nano_usd=cost)


@pytest.fixture
async def down() -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(DOWN_URL, socket_connect_timeout=0.2)
    yield c
    await c.aclose()


async def _stream_request_ids(client: redis.Redis, stream: str) -> list[str]:
    entries: Any = await client.xrange(stream)
    return [UsageEvent.from_json(fields[b"e"]).request_id for _, fields in entries]


async def _ledger_ids(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        return [r["request_id"] for r in await conn.fetch("SELECT request_id FROM usage_ledger ORDER BY 1")]


async def _drain_into_ledger(client: redis.Redis, pool: asyncpg.Pool, stream: str) -> None:
    writer = LedgerWriter(client, pool, stream, consumer="w", batch_size=200, block_ms=20)
    await writer.ensure_group()
    while await writer.drain_once(block_ms=20):
        pass


class _HookedRedis:
    """The real client, except that a pipeline runs ``before_execute`` (once) just before it executes:
    that is the moment a replay has read the spool file and not yet removed it."""

    def __init__(self, real: redis.Redis, before_execute: Callable[[], Awaitable[None]]):
        self._real = real
        self._hook: Callable[[], Awaitable[None]] | None = before_execute

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._real.pipeline(*args, **kwargs)
        execute = pipe.execute

        async def hooked(*a: Any, **k: Any) -> Any:
            hook, self._hook = self._hook, None
            if hook is not None:
                await hook()
            return await execute(*a, **k)

        pipe.execute = hooked  # type: ignore[method-assign]
        return pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_an_event_spooled_while_a_replay_is_in_flight_is_not_lost(
        client: redis.Redis, down: redis.Redis, pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path) -> None:
    stream = f"{redis_prefix}usage"
    spooling = UsageRecorder(down, stream, tmp_path)  # this process, Redis unreachable: same spool file
    for rid in ("before-1", "before-2"):
        await spooling.record(_event(rid))

    async def write_during_replay() -> None:
        await spooling.record(_event("during"))

    replaying = UsageRecorder(_HookedRedis(client, write_during_replay), stream, tmp_path)  # type: ignore[arg-type]
    await replaying.replay_spool()
    await replaying.replay_spool()  # the next round picks up what was written meanwhile
    assert sorted(await _stream_request_ids(client, stream)) == ["before-1", "before-2", "during"]
    assert not list(tmp_path.glob("usage-spool-*"))
    await _drain_into_ledger(client, pool, stream)
    assert await _ledger_ids(pool) == ["before-1", "before-2", "during"]


class _Crash(BaseException):
    """The process dies here (not an error any code path would handle)."""


async def test_a_crash_between_xadd_and_unlink_adds_nothing_twice(
        client: redis.Redis, down: redis.Redis, pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = f"{redis_prefix}usage"
    spooling = UsageRecorder(down, stream, tmp_path)
    for i in range(5):
        await spooling.record(_event(f"r{i}"))

    real_unlink = Path.unlink

    def crash_on_spool_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith("usage-spool-"):
            raise _Crash()
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_on_spool_unlink)
    with pytest.raises(_Crash):
        await UsageRecorder(client, stream, tmp_path).replay_spool()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert list(tmp_path.glob("usage-spool-*"))  # the file outlived the "crash"
    assert len(await _stream_request_ids(client, stream)) == 5  # ...after its events were added

    restarted = UsageRecorder(client, stream, tmp_path)  # the next process replays what is left
    await restarted.replay_spool()
    assert sorted(await _stream_request_ids(client, stream)) == [f"r{i}" for i in range(5)]  # once each
    assert not list(tmp_path.glob("usage-spool-*"))
    await _drain_into_ledger(client, pool, stream)
    assert await _ledger_ids(pool) == [f"r{i}" for i in range(5)]


async def test_a_lost_progress_marker_duplicates_in_the_stream_but_never_in_the_ledger(
        client: redis.Redis, down: redis.Redis, pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The layer below the stream: if Redis lost the marker (or it expired), the stream gets the file's
    # events again and the ledger's request-id key keeps one row each.
    stream = f"{redis_prefix}usage"
    spooling = UsageRecorder(down, stream, tmp_path)
    for i in range(3):
        await spooling.record(_event(f"r{i}"))
    real_unlink = Path.unlink

    def crash_on_spool_unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.startswith("usage-spool-"):
            raise _Crash()
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", crash_on_spool_unlink)
    with pytest.raises(_Crash):
        await UsageRecorder(client, stream, tmp_path).replay_spool()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    markers = [k async for k in client.scan_iter(match=f"{stream}:spooled:*")]
    assert markers
    await client.delete(*markers)
    await UsageRecorder(client, stream, tmp_path).replay_spool()
    assert len(await _stream_request_ids(client, stream)) == 6
    await _drain_into_ledger(client, pool, stream)
    assert await _ledger_ids(pool) == ["r0", "r1", "r2"]


_SPOOLER = """
import asyncio, sys
from datetime import UTC, datetime
from pathlib import Path
import redis.asyncio as redis
from services.router.ledger.events import UsageEvent
from services.router.ledger.spool import UsageRecorder

async def main(spool_dir, stream, name, n):
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    recorder = UsageRecorder(down, stream, Path(spool_dir))
    for i in range(int(n)):
        now = datetime.now(UTC)
        await recorder.record(UsageEvent(
            request_id=f"{name}-{i}", started_at=now, finished_at=now, org_id="o", team_id="t", key_id="k",
            model="m", provider="p", input_tokens=1, output_tokens=1, cached_input_tokens=0, cost_nano_usd=1,
            saved_nano_usd=0, price_version=1, cache_tier="miss", status="ok", error_reason="", latency_ms=1,
            degraded=False))

asyncio.run(main(*sys.argv[1:]))
"""


async def test_spooling_processes_and_concurrent_replays_lose_and_duplicate_nothing(
        client: redis.Redis, down: redis.Redis, pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path) -> None:
    # Two other router processes spool into the shared spool folder, this process spools from many tasks
    # too, and two replayers (two routers sharing the folder) replay over and over meanwhile.
    stream = f"{redis_prefix}usage"
    per_process, local = 150, 150
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}"}
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SPOOLER, str(tmp_path), stream, f"p{n}", str(per_process), cwd=ROOT, env=env,
        stderr=asyncio.subprocess.PIPE) for n in range(2)]
    spooling = UsageRecorder(down, stream, tmp_path)
    replayers = [UsageRecorder(client, stream, tmp_path) for _ in range(2)]
    writing = True

    async def write_locally() -> None:
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                await spooling.record(_event(f"local-{i}"))

        await asyncio.gather(*(one(i) for i in range(local)))

    async def replay_repeatedly(recorder: UsageRecorder) -> None:
        while writing:
            await recorder.replay_spool()
            await asyncio.sleep(0.001)

    replaying = [asyncio.create_task(replay_repeatedly(r)) for r in replayers]
    try:
        await write_locally()
        for p in procs:
            _, err = await asyncio.wait_for(p.communicate(), 120)
            assert p.returncode == 0, err.decode(errors="replace")
    finally:
        writing = False
        await asyncio.gather(*replaying)
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    await replayers[0].replay_spool()
    assert not list(tmp_path.glob("usage-spool-*"))
    expected = sorted([f"p{n}-{i}" for n in range(2) for i in range(per_process)]
                      + [f"local-{i}" for i in range(local)])
    in_stream = await _stream_request_ids(client, stream)
    assert len(in_stream) == len(set(in_stream)), "an event reached the stream twice"
    assert sorted(in_stream) == expected, f"{len(set(expected) - set(in_stream))} events lost"
    await _drain_into_ledger(client, pool, stream)
    assert await _ledger_ids(pool) == expected


async def test_a_line_cut_short_does_not_swallow_the_next_event(
        client: redis.Redis, down: redis.Redis, pool: asyncpg.Pool, redis_prefix: str, tmp_path: Path) -> None:
    # A write cut short (disk full, a crash mid-write) leaves a line without its newline; the next event
    # must still be a line of its own (the torn one is set aside, visibly, in the dead-letter stream).
    stream = f"{redis_prefix}usage"
    spooling = UsageRecorder(down, stream, tmp_path)
    await spooling.record(_event("first"))
    with open(spooling.spool_path, "a", encoding="utf-8") as f:
        f.write(_event("torn").to_json()[:40])
    await spooling.record(_event("after"))
    await UsageRecorder(client, stream, tmp_path).replay_spool()
    await _drain_into_ledger(client, pool, stream)
    assert await _ledger_ids(pool) == ["after", "first"]
    assert await client.xlen(f"{stream}:dead") == 1
