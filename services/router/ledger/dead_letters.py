"""Dead letters of the usage ledger: listed, replayed (repaired if need be) and counted, never silent.

The ledger writer moves an entry it cannot write (malformed, or a row PostgreSQL refuses) to
``<stream>:dead`` with the reason (error class, SQLSTATE, column; never the values). Here:
- ``list_page``: the entries, oldest first, and how many there are;
- ``replay``: each entry is inserted into the ledger in one transaction with its audit row
  (``ON CONFLICT (request_id) DO NOTHING``: a request already in the ledger is not written twice) and
  removed from the dead stream only after that transaction committed. A crash in between leaves it
  there; replaying it again finds the row and removes it, so the ledger holds it exactly once. Refused
  again, it stays, with the new reason (and a new entry id). An operator may pass a repaired event for
  one entry: same request id (the row's identity), every field of the right type;
- ``DeadLetterMonitor``: polls the count and publishes it (the router's health service reports the
  ``tollgate.router.v1.Ledger`` service NOT_SERVING while there are any) and logs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.errors import Unavailable, Violations
from services.router.db import acquire
from services.router.ledger.events import MALFORMED, UsageEvent, guard_event, utcnow
from services.router.ledger.writer import BAD_ROW, INSERT_LEDGER_ROW, ledger_row, malformed_reason, refusal_reason
from services.router.tasks import raise_if_cancelling

log = logging.getLogger(__name__)

DEAD_SUFFIX = ":dead"
MAX_PAGE = 1000
AUDIT_ACTION = "replay_dead_letter"

# Replace a dead letter by a new entry with a new reason, only if it is still there (two operators
# replaying the same entry must not leave two copies).
_REPLACE = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return false
"""


class ReplayOutcome(StrEnum):
    INSERTED = "inserted"
    ALREADY_IN_LEDGER = "already_in_ledger"  # written before (an earlier replay, or a duplicate): removed
    REFUSED = "refused"  # refused again: stays, with the new reason
    NOT_FOUND = "not_found"  # not in the dead stream (replayed meanwhile, or a wrong id)


@dataclass(frozen=True)
class DeadLetter:
    id: str  # the entry's id in the dead stream
    request_id: str  # "" when the entry is not even JSON
    reason: str
    event_json: str  # the event as the writer got it (usage events carry no prompt or response text)
    source_id: str  # its id in the usage stream
    dead_at: datetime | None
    attempts: int  # times it was refused (1 + replays refused)


@dataclass(frozen=True)
class DeadLetterPage:
    letters: list[DeadLetter]
    total: int  # entries in the dead stream now
    next_after: str  # pass as ``after`` for the next page; "" on the last one


@dataclass(frozen=True)
class ReplayResult:
    id: str
    request_id: str
    outcome: ReplayOutcome
    reason: str = ""  # why it was refused (again)
    new_id: str = ""  # the entry's id after a refusal (it was re-added with the new reason)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _letter(entry_id: Any, fields: dict[Any, Any]) -> DeadLetter:
    f = {_text(k): _text(v) for k, v in (fields or {}).items()}
    dead_at = None
    with contextlib.suppress(ValueError):
        dead_at = datetime.fromisoformat(f["at"]) if f.get("at") else None
    request_id = f.get("request_id", "")
    if not request_id:  # written before dead letters carried it
        with contextlib.suppress(ValueError, AttributeError):
            request_id = str(json.loads(f.get("e", "")).get("request_id", ""))
    return DeadLetter(id=_text(entry_id), request_id=request_id,
                      reason=f.get("reason") or "unknown (dead-lettered before reasons were recorded)",
                      event_json=f.get("e", ""), source_id=f.get("id", ""), dead_at=dead_at,
                      attempts=int(f["attempts"]) if f.get("attempts", "").isdigit() else 1)


_HINTS = typing.get_type_hints(UsageEvent)


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is datetime:
        return isinstance(value, datetime)
    if isinstance(hint, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    return False


def event_problems(event: UsageEvent) -> list[str]:
    """Fields of the wrong type (a hand-repaired event; the router's own events are typed)."""
    problems = [f"{f.name}: wrong type" for f in dataclasses.fields(event)
                if not _type_ok(getattr(event, f.name), _HINTS[f.name])]
    if not event.request_id:
        problems.append("request_id: required")
    return problems


def parse_repaired(text: str, letter: DeadLetter, field_path: str) -> UsageEvent:
    """A repaired event for ``letter``, or InvalidArgument naming ``field_path``."""
    v = Violations()
    try:
        event = UsageEvent.from_json(text)
    except MALFORMED as exc:
        v.add(field_path, f"not a usage event ({malformed_reason(exc)})")
        v.raise_if_any()
        raise AssertionError("unreachable") from exc
    for problem in event_problems(event):
        v.add(field_path, problem)
    # The request id is the row's identity: a repair must not turn one request into another.
    v.check(not letter.request_id or event.request_id == letter.request_id, field_path,
            "request_id must stay the dead letter's request_id")
    v.raise_if_any()
    return event


class DeadLetterStore:
    """The dead-letter stream of one usage stream, and replays of it into ``usage_ledger``."""

    def __init__(self, client: redis.Redis, pool: asyncpg.Pool, stream_key: str):
        self._redis = client
        self._pool = pool
        self.key = f"{stream_key}{DEAD_SUFFIX}"

    async def count(self) -> int:
        try:
            n: int = await self._redis.xlen(self.key)
        except RedisError as exc:
            raise Unavailable(f"usage stream unavailable ({type(exc).__name__})", reason="BACKEND_ERROR") from None
        return n

    async def list_page(self, limit: int = 100, after: str = "") -> DeadLetterPage:
        """Oldest first, at most ``limit`` (capped at MAX_PAGE), after the entry id ``after``."""
        limit = max(1, min(limit, MAX_PAGE))
        try:
            entries: Any = await self._redis.xrange(self.key, min=f"({after}" if after else "-", max="+",
                                                    count=limit + 1)
            total: int = await self._redis.xlen(self.key)
        except RedisError as exc:
            raise Unavailable(f"usage stream unavailable ({type(exc).__name__})", reason="BACKEND_ERROR") from None
        letters = [_letter(eid, fields) for eid, fields in entries[:limit]]
        return DeadLetterPage(letters, total, letters[-1].id if len(entries) > limit else "")

    async def get(self, entry_id: str) -> DeadLetter | None:
        try:
            entries: Any = await self._redis.xrange(self.key, min=entry_id, max=entry_id, count=1)
        except RedisError as exc:
            raise Unavailable(f"usage stream unavailable ({type(exc).__name__})", reason="BACKEND_ERROR") from None
        return _letter(*entries[0]) if entries else None

    async def _all_ids(self) -> list[str]:
        """Every id present now (entries re-added by this replay come later and are not visited again)."""
        last: Any = await self._redis.xrevrange(self.key, max="+", min="-", count=1)
        if not last:
            return []
        ids: list[str] = []
        after = ""
        while True:
            page: Any = await self._redis.xrange(self.key, min=f"({after}" if after else "-", max=last[0][0],
                                                 count=MAX_PAGE)
            ids += [_text(eid) for eid, _ in page]
            if len(page) < MAX_PAGE:
                return ids
            after = ids[-1]

    async def replay(self, actor: str, ids: list[str] | None, repaired_json: str = "") -> list[ReplayResult]:
        """Replay the given entries (``None``: all), each on its own; ``repaired_json`` replaces the event of
        the one given id."""
        if repaired_json and (ids is None or len(ids) != 1):
            raise AssertionError("a repaired event goes with exactly one id")  # the servicer checks this
        try:
            todo = await self._all_ids() if ids is None else ids
            results = [await self._replay_one(actor, entry_id, repaired_json) for entry_id in todo]
        except RedisError as exc:
            raise Unavailable(f"usage stream unavailable ({type(exc).__name__})", reason="BACKEND_ERROR") from None
        counts = {o: sum(1 for r in results if r.outcome is o) for o in ReplayOutcome}
        log.info("dead letters replayed by %s: %d inserted, %d already in the ledger, %d refused, %d not found",
                 actor, counts[ReplayOutcome.INSERTED], counts[ReplayOutcome.ALREADY_IN_LEDGER],
                 counts[ReplayOutcome.REFUSED], counts[ReplayOutcome.NOT_FOUND])
        return results

    async def _replay_one(self, actor: str, entry_id: str, repaired_json: str) -> ReplayResult:
        letter = await self.get(entry_id)
        if letter is None:
            return ReplayResult(entry_id, "", ReplayOutcome.NOT_FOUND)
        if repaired_json:
            event = parse_repaired(repaired_json, letter, "repaired_event_json")
        else:
            try:
                event = UsageEvent.from_json(letter.event_json)
            except MALFORMED as exc:
                return await self._refused(letter, malformed_reason(exc))
            problems = event_problems(event)
            if problems:
                return await self._refused(letter, f"malformed: {'; '.join(problems)}")
        event, changed = guard_event(event)
        try:
            async with acquire(self._pool, timeout_s=5) as conn, conn.transaction():
                status = await conn.execute(INSERT_LEDGER_ROW, *ledger_row(event))
                inserted = status.endswith(" 1")
                await conn.execute(
                    "INSERT INTO audit_log (actor_key_id, action, target, before, after) VALUES ($1, $2, $3, $4, $5)",
                    actor, AUDIT_ACTION, f"request:{event.request_id}",
                    json.dumps({"dead_letter_id": letter.id, "reason": letter.reason, "attempts": letter.attempts}),
                    json.dumps({"outcome": "inserted" if inserted else "already_in_ledger",
                                "repaired": bool(repaired_json), "guarded_fields": changed}))
        except BAD_ROW as exc:
            return await self._refused(letter, refusal_reason(exc))
        # Committed: only now may the dead letter go (a crash before this line replays it again, harmlessly).
        await self._redis.xdel(self.key, letter.id)
        outcome = ReplayOutcome.INSERTED if inserted else ReplayOutcome.ALREADY_IN_LEDGER
        return ReplayResult(letter.id, event.request_id, outcome)

    async def _refused(self, letter: DeadLetter, reason: str) -> ReplayResult:
        log.warning("dead letter %s (request %s) refused again: %s", letter.id, letter.request_id or "-", reason)
        fields = {"e": letter.event_json, "id": letter.source_id, "request_id": letter.request_id, "reason": reason,
                  "at": utcnow().isoformat(), "attempts": str(letter.attempts + 1)}
        args = [letter.id, *(x for kv in fields.items() for x in kv)]
        new_id: Any = await self._redis.eval(_REPLACE, 1, self.key, *args)
        return ReplayResult(letter.id, letter.request_id, ReplayOutcome.REFUSED, reason,
                            _text(new_id) if new_id else "")


class DeadLetterMonitor:
    """Publishes the dead-letter count every ``every_s`` (health, log); a non-zero count is logged again
    every ``remind_s`` so it cannot scroll away unnoticed."""

    def __init__(self, store: DeadLetterStore, publish: Callable[[int], Awaitable[None]], *, every_s: float = 10.0,
                 remind_s: float = 300.0):
        self._store = store
        self._publish = publish
        self._every = every_s
        self._remind = remind_s
        self.count: int | None = None  # last known; None before the first check (and the health is unknown)
        self._logged_at = 0.0

    async def check_once(self) -> int:
        n = await self._store.count()
        now = time.monotonic()
        if n != self.count or (n and now - self._logged_at >= self._remind):
            if n:
                log.warning("ledger dead letters: %d in %s (tollgate dead-letters list / replay)", n, self._store.key)
            elif self.count:
                log.info("ledger dead letters: none left")
            self._logged_at = now
        self.count = n
        await self._publish(n)
        return n

    async def run_forever(self) -> None:
        while True:
            raise_if_cancelling()
            with contextlib.suppress(Unavailable):  # Redis away: keep the last state, try again
                await self.check_once()
            await asyncio.sleep(self._every)
