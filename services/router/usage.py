"""Usage events: recorded on a Redis Stream, moved into the PostgreSQL ledger in batches.

Guarantees (DESIGN.md step 10):
- every served request produces one event with a unique request id;
- the writer inserts with ``ON CONFLICT (request_id) DO NOTHING`` and acknowledges
  stream entries only after the insert committed, so a crash or restart between
  the two re-delivers, and the ledger still holds each request exactly once;
- PostgreSQL down: entries stay pending in the stream and are written when it returns;
- Redis down: events are appended to a local spool file and replayed into the stream later;
- an entry that cannot be parsed is moved to ``<stream>:dead`` (kept, counted, logged by id),
  never retried forever in front of the good ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from services.router.db import CONNECTION_ERRORS
from services.router.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

GROUP = "ledger"


@dataclass
class UsageEvent:
    request_id: str
    started_at: datetime
    finished_at: datetime
    org_id: str
    team_id: str
    key_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    saved_nano_usd: int
    price_version: int | None
    cache_tier: str  # "miss" | "exact" | "semantic" | "none"
    status: str  # "ok" | "cancelled" | "error" | "rejected"
    error_reason: str
    latency_ms: int
    degraded: bool
    variant: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> UsageEvent:
        data: dict[str, Any] = json.loads(raw)
        data["started_at"] = datetime.fromisoformat(data["started_at"])
        data["finished_at"] = datetime.fromisoformat(data["finished_at"])
        return cls(**data)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UsageRecorder:
    """Appends events to the stream; spools to a local file while Redis is unreachable."""

    def __init__(self, client: redis.Redis, stream_key: str, spool_dir: Path):
        self._redis = client
        self._stream = stream_key
        self._spool_dir = spool_dir
        self._spool_lock = asyncio.Lock()

    @property
    def spool_path(self) -> Path:
        return self._spool_dir / f"usage-spool-{os.getpid()}.jsonl"

    async def record(self, event: UsageEvent) -> None:
        payload = event.to_json()
        try:
            await self._redis.xadd(self._stream, {"e": payload})
        except (RedisError, OSError):
            await self._spool(payload)

    async def _spool(self, payload: str) -> None:
        async with self._spool_lock:
            self._spool_dir.mkdir(parents=True, exist_ok=True)
            # fsync: the event must survive the process dying before Redis returns.
            await asyncio.to_thread(_append_line, self.spool_path, payload)
        log.warning("redis unavailable: usage event spooled locally")

    async def replay_spool(self) -> int:
        """Move spooled events (from any earlier process too) into the stream; returns how many."""
        moved = 0
        async with self._spool_lock:
            for path in sorted(self._spool_dir.glob("usage-spool-*.jsonl")):
                lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
                if lines:
                    pipe = self._redis.pipeline(transaction=False)
                    for line in lines:
                        pipe.xadd(self._stream, {"e": line})
                    await pipe.execute()
                path.unlink()
                moved += len(lines)
        if moved:
            log.info("replayed %d spooled usage events", moved)
        return moved

    async def replay_forever(self, every_s: float = 2.0) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(every_s)
            if not self._spool_dir.exists():
                continue
            with contextlib.suppress(RedisError, OSError):  # still down: try again later
                await self.replay_spool()


def _append_line(path: Path, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


_INSERT = """
INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider,
    input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, price_version,
    cache_tier, status, error_reason, latency_ms, degraded, variant, labels)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)
ON CONFLICT (request_id) DO NOTHING
"""


def _row(e: UsageEvent) -> tuple[Any, ...]:
    return (e.request_id, e.started_at, e.finished_at, e.org_id, e.team_id, e.key_id, e.model, e.provider,
            e.input_tokens, e.output_tokens, e.cached_input_tokens, e.cost_nano_usd, e.saved_nano_usd,
            e.price_version, e.cache_tier, e.status, e.error_reason, e.latency_ms, e.degraded, e.variant,
            json.dumps(e.labels))


_RETRYABLE: tuple[type[BaseException], ...] = (RedisError, *CONNECTION_ERRORS)
# What a single row can cause (as opposed to the database being away): not worth retrying.
_BAD_ROW: tuple[type[BaseException], ...] = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _request_id_of(raw: str | bytes) -> str:
    try:
        return str(json.loads(raw).get("request_id", ""))
    except (ValueError, AttributeError):
        return ""


class LedgerWriter:
    """Consumer-group reader of the usage stream that writes batches into ``usage_ledger``."""

    def __init__(self, client: redis.Redis, pool: asyncpg.Pool, stream_key: str, *, consumer: str,
                 batch_size: int = 500, block_ms: int = 1000, claim_idle_ms: int = 30_000,
                 max_backoff_s: float = 5.0, linger_s: float = 0.0):
        self._redis = client
        self._pool = pool
        self._stream = stream_key
        self._dead = f"{stream_key}:dead"
        self._consumer = consumer
        self._batch = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._max_backoff = max_backoff_s
        # After a short batch, wait this long before reading again: under load one INSERT then carries
        # many events instead of one per request (the ledger lags by at most this much more).
        self._linger = linger_s
        self.written = 0  # rows handed to PostgreSQL (duplicates included), for tests and metrics

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def drain_once(self, block_ms: int | None = None) -> int:
        """Write one batch: first this consumer's pending entries, then others' stale ones, then new ones."""
        entries = await self._read("0", None)
        if not entries:
            entries = await self._claim_stale()
        if not entries:
            entries = await self._read(">", self._block_ms if block_ms is None else block_ms)
        if not entries:
            return 0
        ids = [entry_id for entry_id, _ in entries]
        events = []
        poison: list[tuple[Any, Any]] = []
        for entry_id, fields in entries:
            raw = fields.get(b"e") or fields.get("e")
            if raw is None:
                continue  # deleted after delivery: nothing to write, only to acknowledge
            try:
                events.append(UsageEvent.from_json(raw))
            except (ValueError, TypeError, KeyError) as exc:
                log.error("usage entry %r is malformed (%s); moved to the dead-letter stream", entry_id,
                          type(exc).__name__)
                poison.append((entry_id, raw))
        if events:
            try:
                async with self._pool.acquire(timeout=5) as conn, conn.transaction():
                    await conn.executemany(_INSERT, [_row(e) for e in events])
            except _BAD_ROW:
                # One row PostgreSQL refuses (say, a value out of range) must not block the whole stream:
                # write them one by one and set the refused ones aside.
                poison += await self._insert_one_by_one(entries, events)
            self.written += len(events)
        for entry_id, raw in poison:
            await self._redis.xadd(self._dead, {"e": raw, "id": entry_id})
        # Acknowledge only after the rows are committed.
        # Acknowledge and trim in one MULTI/EXEC: a writer killed between the two would otherwise leave
        # acknowledged entries in the stream for good.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, GROUP, *ids)
            pipe.xdel(self._stream, *ids)
            await pipe.execute()
        return len(events)

    async def _insert_one_by_one(self, entries: list[tuple[Any, dict[Any, Any]]],
                                 events: list[UsageEvent]) -> list[tuple[Any, Any]]:
        by_request: dict[str, tuple[Any, Any]] = {}
        for entry_id, fields in entries:
            raw = fields.get(b"e") or fields.get("e")
            if raw is not None:
                by_request.setdefault(_request_id_of(raw), (entry_id, raw))
        refused: list[tuple[Any, Any]] = []
        async with self._pool.acquire(timeout=5) as conn:
            for event in events:
                try:
                    await conn.execute(_INSERT, *_row(event))
                except _BAD_ROW as exc:
                    log.error("ledger refused request %s (%s); moved to the dead-letter stream", event.request_id,
                              type(exc).__name__)
                    if event.request_id in by_request:
                        refused.append(by_request[event.request_id])
        return refused

    async def _read(self, start: str, block_ms: int | None) -> list[tuple[Any, dict[Any, Any]]]:
        resp: Any = await self._redis.xreadgroup(GROUP, self._consumer, {self._stream: start},
                                            count=self._batch, block=block_ms)
        if not resp:
            return []
        # Entries deleted after being read come back with no fields; they are still acknowledged below.
        return [(eid, fields or {}) for eid, fields in resp[0][1]]

    async def _claim_stale(self) -> list[tuple[Any, dict[Any, Any]]]:
        """Take over entries another writer read but never acknowledged (it crashed)."""
        resp: Any = await self._redis.xautoclaim(self._stream, GROUP, self._consumer,
                                            min_idle_time=self._claim_idle_ms, start_id="0-0", count=self._batch)
        return [(eid, fields or {}) for eid, fields in resp[1]]

    async def run_forever(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self.ensure_group()
                while True:
                    raise_if_cancelling()
                    written = await self.drain_once()
                    backoff = 0.2
                    if self._linger and 0 < written < self._batch:
                        await asyncio.sleep(self._linger)
            except asyncio.CancelledError:
                raise
            except _RETRYABLE as exc:
                log.warning("ledger writer waiting (%s); retry in %.1fs", type(exc).__name__, backoff)
            except Exception:
                log.exception("ledger writer error; retry in %.1fs", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
