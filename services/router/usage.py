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
  never retried forever in front of the good ones and never silent: services/router/dead_letters.py
  lists, counts (health) and replays them.

Exactly once, by layer: spool -> stream, each spooled line is added once (a progress marker per file);
record() -> stream is at least once (an XADD whose reply was lost is spooled too); stream -> ledger is
exactly once per request id (``ON CONFLICT (request_id) DO NOTHING``), which also absorbs the former.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
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


# What parsing a stream entry into a UsageEvent can raise (RecursionError: absurdly nested JSON).
MALFORMED: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, RecursionError)
_MALFORMED_OR_NOT_AN_OBJECT: tuple[type[BaseException], ...] = (*MALFORMED, AttributeError)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UsageRecorder:
    """Appends events to the stream; spools to a local file while Redis is unreachable.

    The spool folder may be shared by several router processes (and recorders). Exactly-once into the
    stream, whatever a replay races with:
    - writers append to ``usage-spool-<pid>.jsonl`` while holding an exclusive ``flock`` on
      ``spool.lock`` (one lock for the folder, so it also covers other processes and threads);
    - a replay first renames every ``*.jsonl`` to a unique ``*.replaying`` name under that same lock, so
      no writer can append to a file being replayed: the next write creates a fresh file;
    - a ``*.replaying`` file is replayed by one replayer at a time (a non-blocking ``flock`` on the file
      itself, released by the kernel if that process dies), in chunks: each chunk's XADDs and a progress
      marker ``<stream>:spooled:<file name>`` (lines delivered so far) are one MULTI/EXEC, so a replay that
      dies after XADD and before the unlink resumes after what it delivered, instead of adding it again;
    - the file is removed only after every line is in the stream; then the marker.
    If the marker itself is lost (Redis lost data, or it expired after ``MARKER_TTL_S``), the lines come
    again and the ledger's request-id key still keeps one row each.
    """

    CHUNK = 500
    MARKER_TTL_S = 7 * 24 * 3600

    def __init__(self, client: redis.Redis, stream_key: str, spool_dir: Path):
        self._redis = client
        self._stream = stream_key
        self._spool_dir = spool_dir
        self._replay_lock = asyncio.Lock()  # one replay at a time in this recorder (the files lock the rest)

    @property
    def spool_path(self) -> Path:
        return self._spool_dir / f"usage-spool-{os.getpid()}.jsonl"

    async def record(self, event: UsageEvent) -> None:
        payload = event.to_json()
        try:
            await self._redis.xadd(self._stream, {"e": payload})
        except (RedisError, OSError):
            # An XADD whose reply was lost may have been applied: then the event is in the stream and in
            # the spool, and the ledger's request-id key keeps it once.
            await self._spool(payload)

    async def _spool(self, payload: str) -> None:
        # fsync: the event must survive the process dying before Redis returns.
        await asyncio.to_thread(_append_spooled, self._spool_dir, self.spool_path, payload)
        log.warning("redis unavailable: usage event spooled locally")

    async def replay_spool(self) -> int:
        """Move spooled events (from any process, earlier or running) into the stream; returns how many."""
        moved = 0
        async with self._replay_lock:
            if not self._spool_dir.exists():
                return 0
            await asyncio.to_thread(_rotate_spool_files, self._spool_dir)
            for path in sorted(self._spool_dir.glob(f"usage-spool-*{_REPLAYING}")):
                moved += await self._replay_file(path)
        if moved:
            log.info("replayed %d spooled usage events", moved)
        return moved

    async def _replay_file(self, path: Path) -> int:
        fd = await asyncio.to_thread(_claim, path)
        if fd is None:
            return 0  # another replayer has it, or it is already gone
        try:
            lines = await asyncio.to_thread(_read_lines, fd)
            marker = f"{self._stream}:spooled:{path.name}"
            done = int(await self._redis.get(marker) or 0)
            for start in range(done, len(lines), self.CHUNK):
                chunk = lines[start:start + self.CHUNK]
                async with self._redis.pipeline(transaction=True) as pipe:
                    for line in chunk:
                        pipe.xadd(self._stream, {"e": line})
                    pipe.set(marker, start + len(chunk), ex=self.MARKER_TTL_S)
                    await pipe.execute()
            # Unlink while holding the file's lock: a replayer that opened it meanwhile finds it gone.
            await asyncio.to_thread(path.unlink)
            await self._redis.delete(marker)
            return len(lines) - done
        finally:
            os.close(fd)

    async def replay_forever(self, every_s: float = 2.0) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(every_s)
            if not self._spool_dir.exists():
                continue
            with contextlib.suppress(RedisError, OSError):  # still down: try again later
                await self.replay_spool()


_REPLAYING = ".replaying"
_LOCK_FILE = "spool.lock"


@contextlib.contextmanager
def _folder_lock(spool_dir: Path) -> Iterator[None]:
    """Exclusive across processes and threads (each call opens its own file description)."""
    fd = os.open(spool_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _append_spooled(spool_dir: Path, path: Path, line: str) -> None:
    spool_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(spool_dir), open(path, "a+b") as f:
        data = (line + "\n").encode("utf-8")
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # an earlier write was cut short (disk full): keep this line whole
                data = b"\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rotate_spool_files(spool_dir: Path) -> None:
    """Rename every file writers append to; the next write starts a new one."""
    with _folder_lock(spool_dir):
        for path in spool_dir.glob("usage-spool-*.jsonl"):
            path.rename(path.with_name(f"{path.stem}-{uuid.uuid4().hex}{_REPLAYING}"))
    _fsync_dir(spool_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _claim(path: Path) -> int | None:
    """An open descriptor holding the file's exclusive lock, or None if another replayer holds it or it is
    gone (replayed and removed since it was listed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def _read_lines(fd: int) -> list[str]:
    with os.fdopen(os.dup(fd), encoding="utf-8", errors="replace") as f:
        return [ln for ln in f.read().splitlines() if ln.strip()]


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


# --- what the ledger's column types could refuse ----------------------------------------------------
# The router validates requests (libs/validation.py) so none of this should happen; the writer still must
# not lose a served request's bill over a value PostgreSQL cannot store. A value is made storable, the
# row keeps its cost, and the label `ledger_guard` names the fields that were changed (logged by id).
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)
_INT4_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "latency_ms")  # integer columns
_INT8_FIELDS = ("cost_nano_usd", "saved_nano_usd", "price_version")  # bigint columns
_TEXT_FIELDS = ("org_id", "team_id", "key_id", "model", "provider", "cache_tier", "status", "error_reason",
                "variant")
GUARD_LABEL = "ledger_guard"


def _storable_text(value: str) -> str:
    # text and jsonb refuse NUL (and a lone surrogate cannot be encoded as UTF-8 at all).
    cleaned = value.replace("\x00", "\ufffd")
    try:
        cleaned.encode("utf-8")
    except UnicodeEncodeError:
        cleaned = cleaned.encode("utf-8", "replace").decode("utf-8")
    return cleaned


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def guard_event(e: UsageEvent) -> tuple[UsageEvent, list[str]]:
    """The event with every value storable in ``usage_ledger``, and the names of the fields that changed.

    Not changed: the request id (it is the row's identity: an id PostgreSQL refuses stays refused, visible in
    the dead-letter stream) and values of the wrong type (only a hand-edited event can have them)."""
    changes: dict[str, Any] = {}
    for name in _INT4_FIELDS + _INT8_FIELDS:
        value = getattr(e, name)
        if isinstance(value, int) and not isinstance(value, bool):
            clamped = _clamp(value, INT4 if name in _INT4_FIELDS else INT8)
            if clamped != value:
                changes[name] = clamped
    for name in _TEXT_FIELDS:
        value = getattr(e, name)
        if isinstance(value, str) and _storable_text(value) != value:
            changes[name] = _storable_text(value)
    for name in ("started_at", "finished_at"):
        value = getattr(e, name)
        if isinstance(value, datetime) and value.tzinfo is None:  # timestamptz: a naive time is taken as UTC
            changes[name] = value.replace(tzinfo=UTC)
    if isinstance(e.labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in e.labels.items()):
        labels = {_storable_text(k): _storable_text(v) for k, v in e.labels.items()}
        if labels != e.labels:
            changes["labels"] = labels
    if not changes:
        return e, []
    fields = sorted(changes)
    labels = changes.get("labels", e.labels)
    changes["labels"] = {**(labels if isinstance(labels, dict) else {}), GUARD_LABEL: ",".join(fields)}
    return replace(e, **changes), fields


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
    except _MALFORMED_OR_NOT_AN_OBJECT:
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
