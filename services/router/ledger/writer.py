"""Usage events: recorded on a Redis Stream, moved into the PostgreSQL ledger in batches.

Guarantees (DESIGN.md step 10):
- every served request produces one event with a unique request id;
- the writer inserts with ``ON CONFLICT (request_id) DO NOTHING`` and acknowledges
  stream entries only after the insert committed, so a crash or restart between
  the two re-delivers, and the ledger still holds each request exactly once;
- PostgreSQL down: entries stay pending in the stream and are written when it returns;
- Redis down: events are appended to a local spool file and replayed into the stream later, each
  spooled line exactly once (see ``UsageRecorder``: rotation under a folder lock, progress markers);
- values the ledger's column types cannot hold (token counts past ``integer``, amounts past ``bigint``,
  NUL in text) are made storable and labelled (``guard_event``) rather than refused: a served request
  is always billed;
- an entry that cannot be parsed or that PostgreSQL still refuses is moved to ``<stream>:dead`` with
  the reason (class, SQLSTATE, column; never values), in the same MULTI/EXEC as the acknowledgement,
  never retried forever in front of the good ones and never silent: services/router/ledger/dead_letters.py
  lists, counts (health) and replays them.

Exactly once, by layer: spool -> stream, each spooled line is added once (a progress marker per file);
record() -> stream is at least once (an XADD whose reply was lost is spooled too); stream -> ledger is
exactly once per request id (``ON CONFLICT (request_id) DO NOTHING``), which also absorbs the former.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from services.router.db import CONNECTION_ERRORS
from services.router.ledger.events import (
    GUARD_LABEL,
    MALFORMED,
    MALFORMED_OR_NOT_AN_OBJECT,
    UsageEvent,
    guard_event,
    utcnow,
)
from services.router.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

GROUP = "ledger"


INSERT_LEDGER_ROW = """
INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider,
    input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, price_version,
    cache_tier, status, error_reason, latency_ms, degraded, variant, labels)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)
ON CONFLICT (request_id) DO NOTHING
"""
# In the order of INSERT_LEDGER_ROW's parameters: names a refused argument ($N) in a dead letter's reason.
COLUMNS = ("request_id", "started_at", "finished_at", "org_id", "team_id", "key_id", "model", "provider",
           "input_tokens", "output_tokens", "cached_input_tokens", "cost_nano_usd", "saved_nano_usd",
           "price_version", "cache_tier", "status", "error_reason", "latency_ms", "degraded", "variant", "labels")


def ledger_row(e: UsageEvent) -> tuple[Any, ...]:
    return (e.request_id, e.started_at, e.finished_at, e.org_id, e.team_id, e.key_id, e.model, e.provider,
            e.input_tokens, e.output_tokens, e.cached_input_tokens, e.cost_nano_usd, e.saved_nano_usd,
            e.price_version, e.cache_tier, e.status, e.error_reason, e.latency_ms, e.degraded, e.variant,
            json.dumps(e.labels))


# --- why a row was refused, without its values -------------------------------------------------------
_ARGUMENT = re.compile(r"^invalid input for query argument \$(\d+): .* \(([^()]*)\)\s*$", re.DOTALL)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def refusal_reason(exc: BaseException) -> str:
    """The error class, SQLSTATE, column and message of a refused row, with every quoted value elided:
    dead letters and logs say why, never what (a label value could be anything)."""
    name = type(exc).__name__
    state = getattr(exc, "sqlstate", None) or ""
    text = str(exc).split("\n", 1)[0]
    column = getattr(exc, "column_name", None) or ""
    match = _ARGUMENT.match(str(exc))
    if match:  # refused by asyncpg's encoder before it reached the server: "$N: <value> (<why>)"
        index = int(match.group(1)) - 1
        column = COLUMNS[index] if 0 <= index < len(COLUMNS) else column
        text = match.group(2)
    text = _QUOTED.sub("'…'", text)[:300]
    where = f" column {column}" if column else ""
    return f"{name}{f' [{state}]' if state else ''}{where}: {text}"


def malformed_reason(exc: BaseException) -> str:
    """Why an entry is not a usage event (never the offending text itself)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed: not JSON ({exc.msg} at position {exc.pos})"
    if isinstance(exc, TypeError | KeyError):  # fields missing or unknown: the message names fields only
        return f"malformed: {type(exc).__name__}: {str(exc)[:300]}"
    return f"malformed: {type(exc).__name__}"


def dead_letter_fields(raw: str | bytes, source_id: str | bytes, reason: str) -> dict[Any, Any]:
    """A dead-letter stream entry: the event as it was, where it came from, why, and when."""
    return {"e": raw, "id": source_id, "request_id": _request_id_of(raw),
            "reason": reason.encode("utf-8", "replace").decode("utf-8"), "at": utcnow().isoformat()}


_RETRYABLE: tuple[type[BaseException], ...] = (RedisError, *CONNECTION_ERRORS)
# What a single row can cause (as opposed to the database being away): not worth retrying. Too large a
# value (an index row past the btree limit) is a row's fault too.
BAD_ROW: tuple[type[BaseException], ...] = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                                            asyncpg.ProgramLimitExceededError)


def _request_id_of(raw: str | bytes) -> str:
    try:
        rid = str(json.loads(raw).get("request_id", ""))
    except MALFORMED_OR_NOT_AN_OBJECT:
        return ""
    # A forged "\\ud800" would make the dead-letter XADD itself fail (and block the stream behind it).
    return rid.encode("utf-8", "replace").decode("utf-8")


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
        events: list[tuple[Any, Any, UsageEvent]] = []
        poison: list[tuple[Any, Any, str]] = []  # (entry id, raw event, reason)
        for entry_id, fields in entries:
            raw = fields.get(b"e") or fields.get("e")
            if raw is None:
                if fields:  # an entry without an event is not silently acknowledged: it goes to the dead letters
                    log.error("usage entry %r has no event field; moved to the dead-letter stream", entry_id)
                    poison.append((entry_id, b"", "malformed: no 'e' field"))
                continue  # no fields: deleted after delivery, nothing to write, only to acknowledge
            try:
                event = UsageEvent.from_json(raw)
            except MALFORMED as exc:
                log.error("usage entry %r is malformed (%s); moved to the dead-letter stream", entry_id,
                          type(exc).__name__)
                poison.append((entry_id, raw, malformed_reason(exc)))
                continue
            try:
                guarded, changed = guard_event(event)
            except Exception as exc:  # a forged or hand-edited entry must never stall the stream behind it
                log.error("usage entry %r cannot be made storable (%s); moved to the dead-letter stream", entry_id,
                          type(exc).__name__)
                poison.append((entry_id, raw, f"malformed: {type(exc).__name__}"))
                continue
            if changed:
                log.warning("request %s: %s made storable for the ledger (label %s)", event.request_id,
                            ", ".join(changed), GUARD_LABEL)
            events.append((entry_id, raw, guarded))
        if events:
            try:
                async with self._pool.acquire(timeout=5) as conn, conn.transaction():
                    await conn.executemany(INSERT_LEDGER_ROW, [ledger_row(e) for _, _, e in events])
            except BAD_ROW:
                # One row PostgreSQL refuses (say, a value out of range) must not block the whole stream:
                # write them one by one and set the refused ones aside.
                poison += await self._insert_one_by_one(events)
            self.written += len(events)
        # Acknowledge only after the rows are committed. Dead letters, acknowledgement and trim in one
        # MULTI/EXEC: a writer killed in between would otherwise leave acknowledged entries in the stream for
        # good, or add a refused entry to the dead letters twice.
        async with self._redis.pipeline(transaction=True) as pipe:
            for entry_id, raw, reason in poison:
                pipe.xadd(self._dead, dead_letter_fields(raw, entry_id, reason))
            pipe.xack(self._stream, GROUP, *ids)
            pipe.xdel(self._stream, *ids)
            await pipe.execute()
        if poison:
            log.error("%d usage entries moved to %s (tollgate dead-letters list)", len(poison), self._dead)
        return len(events)

    async def _insert_one_by_one(self, events: list[tuple[Any, Any, UsageEvent]]) -> list[tuple[Any, Any, str]]:
        refused: list[tuple[Any, Any, str]] = []
        async with self._pool.acquire(timeout=5) as conn:
            for entry_id, raw, event in events:
                try:
                    await conn.execute(INSERT_LEDGER_ROW, *ledger_row(event))
                except BAD_ROW as exc:
                    reason = refusal_reason(exc)
                    log.error("ledger refused request %s (%s); moved to the dead-letter stream", event.request_id,
                              reason)
                    refused.append((entry_id, raw, reason))
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
