"""Token buckets and USD budgets in Redis: reserve before a generation, settle after it.

Every operation is one Lua script (:mod:`services.ratelimit.lua`), one round trip: a reserve
checks and debits every token bucket (RPM/TPM/TPD at key, team, org, client IP, global) and
every budget (daily/monthly at org, team, key, global) together or not at all, so concurrent
reserves from any number of replicas never admit more than a bucket or budget holds, and a
reservation is refunded exactly once whether by commit, release or the expiry sweep.

Budgets: the estimated cost is held at reserve, the actual cost replaces it at commit, the hold
is dropped at release or expiry. A reserve is refused when a budget's window is at 100 %
(``used >= limit``, used = committed + held) or when its estimate does not fit in what is left.
Committed spend reaching 80/90/95/100 % emits one event per threshold and window on the stream
``{prefix}budget_alerts``; a reservation that leaves any budget at 95 % or more carries
``prefer_cheaper``.

While Redis is unreachable, reserves and usage queries are answered by the optional
:class:`~services.ratelimit.fallback.LocalLimiter` (``degraded=True``; its bound is documented
there); settling a Redis reservation then fails with Unavailable, and the reservation is
refunded when it expires. What Redis admits is mirrored into the fallback's buckets, so that
they go on from what was spent; what the fallback admitted (bucket draws and budget spend) is
written back when Redis returns, before this process reserves there again.

``charge`` takes usage admitted without this service (the router's local limiter while this
service was unreachable): drawn from every bucket without refusing, its cost committed to the
budgets, once per (key, charge id); while Redis is down the fallback takes it the same way and
writes it back with its own admissions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FieldViolation, InvalidArgument, NotFound, Unavailable
from services.ratelimit import lua
from services.ratelimit.buckets import (
    Bucket,
    Reservation,
    Usage,
    UsageRow,
    bucket_key,
    buckets_for,
    quota_exceeded,
    usage_row,
)
from services.ratelimit.budgets import (
    MAX_NANO_USD,
    BudgetFailure,
    BudgetLine,
    budget_key,
    budget_lines_for,
    window_at,
    window_from_id,
)
from services.ratelimit.fallback import LocalLimiter, ShadowBucket
from services.ratelimit.limits import LimitStore, Period, Scope, Subject
from services.ratelimit.transport import Connections, PackedScript, bulk

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kept back from the caller's deadline so the answer can still reach it.
_HOP_MARGIN_S = 0.005
# Redis replies (prefixes) that mean "this server cannot serve right now", not a bug of ours.
_UNAVAILABLE_REPLIES = ("READONLY", "LOADING", "BUSY", "MASTERDOWN", "OOM", "TRYAGAIN", "CLUSTERDOWN")


class _RedisDown(Exception):
    """Redis could not be used for this call (connection, timeout, or a server that cannot serve)."""


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
        return True
    return isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(_UNAVAILABLE_REPLIES)


_MAX_CACHED_PLANS = 100_000
# Buckets or budget windows per write-back script: a long outage's worth must not hold Redis (one
# script runs at a time) past the call timeout, nor time out and be written again.
_WRITE_BACK_BATCH = 500


@dataclass(frozen=True)
class _Plan:
    buckets: list[Bucket]
    lines: list[BudgetLine]
    keys: bytes  # the buckets' Redis keys, packed (RESP bulk strings)
    args: bytes  # the reserve script's arguments after the per-call ones, packed
    n_args: int
    shadow: tuple[ShadowBucket, ...]  # the buckets as the fallback mirrors them


@dataclass(frozen=True)
class Charged:
    """The outcome of a charge."""

    replayed: bool = False  # this charge id was charged before: nothing was drawn this time
    degraded: bool = False  # the local fallback took it (Redis unavailable)


@dataclass(frozen=True)
class SpendReconciliation:
    """A budget window's committed spend before and after reconciling with the ledger."""

    window_start: float
    resets_at: float
    previous_spent: int
    spent: int
    reserved: int


class Limiter:
    """Reserve / commit / release / usage against Redis token buckets and budgets.

    ``prefix`` starts every key. ``fallback`` (optional) answers while Redis is down; without
    it those calls raise Unavailable. After a Redis failure, reserve and usage go straight to
    the fallback for ``redis_retry_s`` instead of paying ``redis_timeout_s`` on every request.
    ``scripts`` exists for tests that need a controllable clock (:func:`lua.key_clock`).
    """

    def __init__(self, redis: aioredis.Redis, store: LimitStore, *, prefix: str,
                 fallback: LocalLimiter | None = None, default_ttl_s: float = 120.0, max_ttl_s: float = 3600.0,
                 redis_timeout_s: float = 0.25, redis_retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, scripts: lua.Scripts = lua.SCRIPTS):
        self._redis = redis
        self._store = store
        self._prefix = prefix
        self._fallback = fallback
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s
        self._redis_timeout_s = redis_timeout_s
        self._redis_retry_s = redis_retry_s
        self._clock = clock
        self._down_until: float | None = None
        self._plans: dict[Subject, _Plan] = {}
        self._plans_generation = -1
        self._exp_key = f"{prefix}rl:exp"
        self.alerts_stream = f"{prefix}budget_alerts"
        self._connections = Connections(redis)
        self._reserve = PackedScript(redis, self._connections, scripts.reserve)
        self._settle = PackedScript(redis, self._connections, scripts.settle)
        self._charge = PackedScript(redis, self._connections, scripts.charge)
        self._sweep = redis.register_script(scripts.sweep)
        self._usage = redis.register_script(scripts.usage)
        self._reconcile = redis.register_script(scripts.reconcile)
        self._add_spend = redis.register_script(scripts.add_spend)
        self._draw = redis.register_script(scripts.draw)
        # One write-back at a time: reserves that find one under way wait for it rather than
        # reserve in a Redis that does not know yet what the fallback admitted.
        self._write_back_lock = asyncio.Lock()

    # -- public API -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the limiter's own Redis connections (the client passed in is the caller's to close)."""
        await self._connections.aclose()

    @property
    def degraded(self) -> bool:
        """Whether Redis is currently considered down."""
        return self._down_until is not None

    async def reserve(self, subject: Subject, estimated_tokens: int, *, estimated_cost_nano_usd: int = 0,
                      request_id: str = "", ttl_s: float | None = None,
                      deadline: Deadline | None = None) -> Reservation:
        """Take ``estimated_tokens`` (and one request) from every limited level and the estimated
        cost from every budget, or nothing at all.

        Raises QuotaExceeded naming each level and kind or budget that has no room, with the
        seconds until all of them would. A non-empty ``request_id`` makes the call idempotent:
        while the first reservation's record lives, the same key and request id get it back.
        """
        if estimated_tokens <= 0:
            raise InvalidArgument([FieldViolation("estimated_tokens", "must be greater than 0")])
        _check_amount("estimated_cost_nano_usd", estimated_cost_nano_usd)
        ttl = self._ttl(ttl_s)
        plan = self._plan(subject)
        request_key = f"{subject.key_id}:{request_id}" if request_id else ""
        if self._redis_usable():
            try:
                # (Also while a write-back is under way: it took the fallback's draws already.)
                if self._fallback is not None and (self._fallback.unsynced or self._write_back_lock.locked()):
                    await self._write_back_local(self._fallback, deadline)
                return await self._call(lambda: self._reserve_redis(
                    plan, estimated_tokens, estimated_cost_nano_usd, ttl, request_key), deadline)
            except _RedisDown as exc:
                self._mark_down(exc)
        return self._require_fallback().reserve(plan.buckets, estimated_tokens, ttl, plan.lines,
                                                estimated_cost_nano_usd, request_key)

    async def commit(self, reservation_id: str, actual_tokens: int, *, actual_cost_nano_usd: int = 0,
                     deadline: Deadline | None = None) -> int:
        """Settle with the actual usage and cost; returns tokens refunded (negative: extra tokens charged)."""
        if actual_tokens < 0:
            raise InvalidArgument([FieldViolation("actual_tokens", "must not be negative")])
        _check_amount("actual_cost_nano_usd", actual_cost_nano_usd)
        if LocalLimiter.owns(reservation_id):
            return self._local_reservations().commit(reservation_id, actual_tokens, actual_cost_nano_usd)
        return await self._settle_redis(reservation_id, "commit", actual_tokens, actual_cost_nano_usd, deadline)

    async def release(self, reservation_id: str, *, deadline: Deadline | None = None) -> None:
        """Give a reservation back in full, request slot included."""
        if LocalLimiter.owns(reservation_id):
            self._local_reservations().release(reservation_id)
            return
        await self._settle_redis(reservation_id, "release", 0, 0, deadline)

    async def charge(self, subject: Subject, charge_id: str, *, requests: int, tokens: int, cost_nano_usd: int = 0,
                     used_at_s: float | None = None, deadline: Deadline | None = None) -> Charged:
        """Charge usage admitted without this service: ``requests`` from the request buckets, ``tokens``
        from the token buckets, never refusing (a bucket stops at zero), and the cost to the committed
        spend of every budget window holding ``used_at_s`` (Unix seconds; None: now), with alerts, as a
        commit would. A bucket whose refill period has passed since ``used_at_s`` is not drawn.

        Idempotent per (key, ``charge_id``) for a day: a replay is answered ``replayed`` and draws nothing.
        """
        if not charge_id:
            raise InvalidArgument([FieldViolation("charge_id", "is required")])
        if requests < 0 or tokens < 0:
            raise InvalidArgument([FieldViolation("requests" if requests < 0 else "tokens", "must not be negative")])
        _check_amount("cost_nano_usd", cost_nano_usd)
        plan = self._plan(subject)
        request_key = f"{subject.key_id}:{charge_id}"
        if self._redis_usable():
            try:
                if self._fallback is not None and (self._fallback.unsynced or self._write_back_lock.locked()):
                    await self._write_back_local(self._fallback, deadline)
                replayed = await self._call(lambda: self._charge_redis(
                    plan, request_key, requests, tokens, cost_nano_usd, used_at_s), deadline)
                return Charged(replayed=replayed)
            except _RedisDown as exc:
                self._mark_down(exc)
        replayed = self._require_fallback().charge(plan.buckets, requests, tokens, plan.lines, cost_nano_usd,
                                                   used_at_s=used_at_s, request_key=request_key)
        return Charged(replayed=replayed, degraded=True)

    async def usage(self, subject: Subject, *, deadline: Deadline | None = None) -> Usage:
        """Limit, used and remaining for every limited level and kind of the subject, then its
        budgets in their current window (used = committed + held; ``reserved`` = held)."""
        plan = self._plan(subject)
        if self._redis_usable():
            try:
                return await self._call(lambda: self._usage_redis(plan.buckets, plan.lines), deadline)
            except _RedisDown as exc:
                self._mark_down(exc)
        return Usage(self._require_fallback().usage(plan.buckets, plan.lines), degraded=True)

    async def reconcile_spend(self, scope: Scope, scope_id: str, period: Period, at_unix_s: float,
                              ledger_spent_nano_usd: int, *,
                              deadline: Deadline | None = None) -> SpendReconciliation:
        """Raise the committed spend of the budget window holding ``at_unix_s`` to the ledger's sum
        for it, if the ledger's is higher (Redis lost writes, or the fallback's spend could not be
        written back). Never lowers it: commits not yet in the ledger are already counted here.
        """
        _check_amount("ledger_spent_nano_usd", ledger_spent_nano_usd)
        window = window_at(period, int(at_unix_s * 1000))
        key = budget_key(self._prefix, scope, scope_id, period, window.window_id)
        try:
            before, after, held = await self._call(lambda: self._reconcile(
                keys=[key], args=[ledger_spent_nano_usd, window.end_ms]), deadline)
        except _RedisDown as exc:
            self._mark_down(exc)
            raise Unavailable("rate limit store unavailable", retry_after_s=max(self._redis_retry_s, 0.1)) from None
        if int(after) != int(before):
            log.info("budget %s:%s %s window %s raised from %s to %s by reconciliation", scope.value, scope_id,
                     period.value, window.window_id, int(before), int(after))
        return SpendReconciliation(window.start_ms / 1000, window.end_ms / 1000, int(before), int(after), int(held))

    async def sweep_expired(self, *, batch: int = 256, max_batches: int = 40) -> int:
        """Refund reservations past their expiry (Redis and local); returns how many were refunded.

        Safe to run on every replica at once: each batch is one script, and a reservation is
        refunded only by whichever script deletes its record first.
        """
        refunded = 0
        if self._fallback is not None:
            refunded = self._fallback.sweep()
            if self._fallback.unsynced and self._redis_usable():
                try:
                    await self._write_back_local(self._fallback, None)
                except _RedisDown as exc:
                    self._mark_down(exc)
        for _ in range(max_batches):
            try:
                seen, done = await self._call(
                    lambda: self._sweep(keys=[self._exp_key], args=[f"{self._prefix}rl:r:", batch]), None)
            except _RedisDown as exc:
                self._mark_down(exc)
                break
            refunded += int(done)
            if int(seen) < batch:
                break
        if refunded:
            log.info("refunded %d expired reservations", refunded)
        return refunded

    # -- Redis ------------------------------------------------------------------------------

    def _record_key(self, reservation_id: str) -> str:
        return f"{self._prefix}rl:r:{reservation_id}"

    def _plan(self, subject: Subject) -> _Plan:
        """What a reserve for ``subject`` checks, with the script arguments that follow from it.

        Cached per configuration snapshot: resolving levels and building arguments is most of
        the Python work of a reserve, and it changes only when the limits or budgets do.
        """
        generation = self._store.generation
        if generation != self._plans_generation or len(self._plans) >= _MAX_CACHED_PLANS:
            self._plans.clear()
            self._plans_generation = generation
        plan = self._plans.get(subject)
        if plan is None:
            levels = self._store.levels_for(subject)
            buckets, lines = buckets_for(levels), budget_lines_for(levels)
            args: list[Any] = []
            for b in buckets:
                args += [b.limit, b.period_ms, int(b.kind.counts_tokens)]
            for line in lines:
                args += [line.key_base(self._prefix), line.period.short, line.limit, line.level.scope.value,
                         line.level.scope_id]
            plan = _Plan(buckets, lines, b"".join(bulk(b.redis_key(self._prefix).encode()) for b in buckets),
                         b"".join(bulk(str(a).encode()) for a in args), len(args),
                         self._fallback.shadow_plan(buckets) if self._fallback is not None else ())
            self._plans[subject] = plan
        return plan

    async def _reserve_redis(self, plan: _Plan, estimated_tokens: int, estimated_cost: int, ttl_s: float,
                             request_key: str) -> Reservation:
        buckets, lines = plan.buckets, plan.lines
        reservation_id = uuid.uuid4().hex
        keys = [self._record_key(reservation_id), self._exp_key]
        if request_key:
            keys.append(f"{self._prefix}rl:q:{request_key}")
        args = [len(buckets), reservation_id, max(1, round(ttl_s * 1000)), estimated_tokens, len(lines),
                estimated_cost, "1" if request_key else "0"]
        parts = [plan.keys, *(bulk(k.encode()) for k in keys), *(bulk(str(a).encode()) for a in args), plan.args]
        result = await self._reserve(len(buckets) + len(keys), len(args) + plan.n_args, parts)
        if int(result[0]) == 1:
            replayed = int(result[4]) == 1
            if self._fallback is not None and not replayed:
                self._fallback.shadow_reserve(reservation_id, plan.shadow, estimated_tokens, ttl_s)
                if lines:
                    used_after, windows = _text(result[5]).split(), _text(result[6]).split()
                    for line, used, window_id in zip(lines, used_after, windows, strict=True):
                        self._fallback.observe(line, window_from_id(line.period, window_id), int(used))
            return Reservation(_text(result[3]), int(result[1]) / 1000, prefer_cheaper=int(result[2]) == 1,
                               replayed=replayed)
        failed = [int(i) - 1 for i in result[2]]
        budget_failures = []
        for j, used, window_id in result[3]:
            line = lines[int(j) - 1]
            budget_failures.append(BudgetFailure(line, int(used), window_from_id(line.period, _text(window_id))))
        raise quota_exceeded(buckets, failed, int(result[1]) / 1000, estimated_tokens, budget_failures,
                             estimated_cost)

    async def _charge_redis(self, plan: _Plan, request_key: str, requests: int, tokens: int, cost: int,
                            used_at_s: float | None) -> bool:
        """Run the charge script; True when the charge id was charged before (nothing drawn)."""
        keys = [f"{self._prefix}rl:c:{request_key}", self.alerts_stream]
        at = "now" if used_at_s is None else str(int(used_at_s * 1000))
        args = [len(plan.buckets), len(plan.lines), requests, tokens, cost, at, lua.RECORD_GRACE_MS]
        parts = [plan.keys, *(bulk(k.encode()) for k in keys), *(bulk(str(a).encode()) for a in args), plan.args]
        result = await self._charge(len(plan.buckets) + len(keys), len(args) + plan.n_args, parts)
        replayed = int(result) == 0
        if self._fallback is not None and not replayed:
            age_s = 0.0 if used_at_s is None else max(0.0, time.time() - used_at_s)
            self._fallback.shadow_charge(plan.shadow, requests, tokens, age_s)
        return replayed

    async def _settle_redis(self, reservation_id: str, mode: str, actual_tokens: int, actual_cost: int,
                            deadline: Deadline | None) -> int:
        # Always tried, even inside the retry window: there is no local alternative for a
        # Redis reservation, and a success is the quickest way to learn Redis is back.
        try:
            keys = [self._record_key(reservation_id), self._exp_key, self.alerts_stream]
            args = [reservation_id, mode, actual_tokens, actual_cost]
            parts = [bulk(str(x).encode()) for x in (*keys, *args)]
            result = await self._call(lambda: self._settle(len(keys), len(args), parts), deadline)
        except _RedisDown as exc:
            self._mark_down(exc)
            raise Unavailable("rate limit store unavailable; the reservation will be refunded when it expires",
                              retry_after_s=max(self._redis_retry_s, 0.1)) from None
        if self._fallback is not None:
            # Not found: settled already (then there is no shadow left) or refunded by Redis's sweep.
            self._fallback.shadow_settle(reservation_id, commit=mode == "commit" and int(result[0]) == 1,
                                         actual_tokens=actual_tokens)
        if int(result[0]) == 0:
            raise NotFound("no such reservation (already settled or expired)")
        return int(result[1])

    async def _usage_redis(self, buckets: Sequence[Bucket], lines: Sequence[BudgetLine]) -> Usage:
        if not buckets and not lines:
            return Usage([])
        args: list[Any] = [len(buckets)]
        for b in buckets:
            args += [b.limit, b.period_ms]
        for line in lines:
            args += [line.key_base(self._prefix), line.period.short]
        levels, budgets = await self._usage(keys=[b.redis_key(self._prefix) for b in buckets], args=args)
        rows = [usage_row(b, float(level)) for b, level in zip(buckets, levels, strict=True)]
        for line, (spent, held, window_id, start_ms, end_ms) in zip(lines, budgets, strict=True):
            used = int(spent) + int(held)
            if self._fallback is not None:
                self._fallback.observe(line, window_from_id(line.period, _text(window_id)), used)
            rows.append(UsageRow(line.level.scope, line.level.scope_id, line.period, line.limit, used=used,
                                 remaining=max(0, line.limit - used), reserved=int(held),
                                 window_start=int(start_ms) / 1000, resets_at=int(end_ms) / 1000))
        return Usage(rows)

    async def _write_back_local(self, fallback: LocalLimiter, deadline: Deadline | None) -> None:
        """Write what the fallback admitted while Redis was away to Redis: bucket draws, then budget spend.

        Each is taken from the fallback and put back if its write fails, so it is written once
        (twice if a write ran but its reply was lost: overcharged, never undercharged). Raises
        _RedisDown (after putting it back) when Redis is still away.
        """
        async with self._write_back_lock:
            if not self._redis_usable():
                # The write-back this one waited for found Redis still away: no second timeout.
                raise _RedisDown("unavailable")
            await self._write_back_draws(fallback, deadline)
            await self._write_back_spend(fallback, deadline)

    async def _write_back_draws(self, fallback: LocalLimiter, deadline: Deadline | None) -> None:
        items = fallback.take_unsynced_draws()
        for start in range(0, len(items), _WRITE_BACK_BATCH):
            batch = items[start:start + _WRITE_BACK_BATCH]
            keys = [bucket_key(self._prefix, *item.identity) for item in batch]
            args: list[Any] = []
            for item in batch:
                args += [item.limit, item.period_ms, item.amount]
            try:
                await self._call(functools.partial(self._draw, keys=keys, args=args), deadline)
            except BaseException:
                fallback.restore_unsynced_draws(items[start:])
                raise
        if items:
            log.info("wrote back the local admissions of %d buckets made while redis was unavailable", len(items))

    async def _write_back_spend(self, fallback: LocalLimiter, deadline: Deadline | None) -> None:
        items = fallback.take_unsynced()
        for start in range(0, len(items), _WRITE_BACK_BATCH):
            batch = items[start:start + _WRITE_BACK_BATCH]
            keys = [budget_key(self._prefix, scope, scope_id, period, window_id)
                    for (scope, scope_id, period, window_id), _, _ in batch]
            args: list[Any] = [amount for _, amount, _ in batch] + [end_ms for _, _, end_ms in batch]
            try:
                await self._call(functools.partial(self._add_spend, keys=keys, args=args), deadline)
            except BaseException:
                fallback.restore_unsynced(items[start:])
                raise
        if items:
            log.info("wrote back budget spend of %d windows committed while redis was unavailable", len(items))

    async def _call(self, fn: Callable[[], Awaitable[T]], deadline: Deadline | None) -> T:
        """One Redis round trip, bounded by our own timeout and the caller's deadline."""
        timeout = self._redis_timeout_s
        caller_bound = False
        if deadline is not None:
            hop = deadline.hop_timeout(_HOP_MARGIN_S)
            if hop < timeout:
                timeout, caller_bound = hop, True
        try:
            async with asyncio.timeout(timeout):
                result = await fn()
        except TimeoutError as exc:
            if caller_bound:
                raise DeadlineExceeded("deadline exceeded waiting for the rate limit store") from None
            raise _RedisDown("timeout") from exc
        except redis_errors.RedisError as exc:
            if _is_unavailable(exc):
                raise _RedisDown(type(exc).__name__) from exc
            raise
        except OSError as exc:
            raise _RedisDown(type(exc).__name__) from exc
        self._mark_up()
        return result

    # -- degraded mode ----------------------------------------------------------------------

    def _redis_usable(self) -> bool:
        return self._down_until is None or self._clock() >= self._down_until

    def _mark_down(self, exc: _RedisDown) -> None:
        if self._down_until is None:
            log.warning("redis unavailable (%s): using the local fallback limiter", exc)
        self._down_until = self._clock() + self._redis_retry_s

    def _mark_up(self) -> None:
        if self._down_until is not None:
            log.info("redis reachable again: leaving the local fallback limiter")
            self._down_until = None

    def _require_fallback(self) -> LocalLimiter:
        if self._fallback is None:
            raise Unavailable("rate limit store unavailable", retry_after_s=max(self._redis_retry_s, 0.1))
        return self._fallback

    def _local_reservations(self) -> LocalLimiter:
        if self._fallback is None:
            raise NotFound("no such reservation (this service keeps no local reservations)")
        return self._fallback

    def _ttl(self, ttl_s: float | None) -> float:
        if ttl_s is None or ttl_s == 0:
            return self._default_ttl_s
        if ttl_s < 0 or ttl_s > self._max_ttl_s:
            raise InvalidArgument([FieldViolation("ttl", f"must be between 0 and {self._max_ttl_s:g} seconds")])
        return ttl_s


def _check_amount(field: str, value: int) -> None:
    if not 0 <= value <= MAX_NANO_USD:
        raise InvalidArgument([FieldViolation(field, f"must be between 0 and {MAX_NANO_USD}")])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
