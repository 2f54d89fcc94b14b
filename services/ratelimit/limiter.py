"""Token-bucket rate limiting in Redis: reserve before a generation, settle after it.

Every operation is one Lua script (:mod:`services.ratelimit.lua`), so concurrent reserves
from any number of replicas never admit more than a bucket holds, and a reservation is
refunded exactly once whether by commit, release or the expiry sweep.

While Redis is unreachable, reserves and usage queries are answered by the optional
:class:`~services.ratelimit.fallback.LocalLimiter` (``degraded=True``); settling a Redis
reservation then fails with Unavailable, and the reservation is refunded when it expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FieldViolation, InvalidArgument, NotFound, Unavailable
from services.ratelimit import lua
from services.ratelimit.buckets import Bucket, Reservation, Usage, buckets_for, quota_exceeded, usage_row
from services.ratelimit.fallback import LocalLimiter
from services.ratelimit.limits import LimitStore, Subject

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


class Limiter:
    """Reserve / commit / release / usage against Redis token buckets.

    ``prefix`` starts every key. ``fallback`` (optional) answers while Redis is down; without
    it those calls raise Unavailable. After a Redis failure, reserve and usage go straight to
    the fallback for ``redis_retry_s`` instead of paying ``redis_timeout_s`` on every request.
    """

    def __init__(self, redis: aioredis.Redis, store: LimitStore, *, prefix: str,
                 fallback: LocalLimiter | None = None, default_ttl_s: float = 120.0, max_ttl_s: float = 3600.0,
                 redis_timeout_s: float = 0.25, redis_retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
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
        self._exp_key = f"{prefix}rl:exp"
        self._reserve = redis.register_script(lua.RESERVE)
        self._settle = redis.register_script(lua.SETTLE)
        self._sweep = redis.register_script(lua.SWEEP)
        self._levels = redis.register_script(lua.LEVELS)

    # -- public API -------------------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """Whether Redis is currently considered down."""
        return self._down_until is not None

    async def reserve(self, subject: Subject, estimated_tokens: int, *, ttl_s: float | None = None,
                      deadline: Deadline | None = None) -> Reservation:
        """Take ``estimated_tokens`` (and one request) from every limited level, or none of them.

        Raises QuotaExceeded naming each level and kind that has no room, with the seconds
        until all of them would.
        """
        if estimated_tokens <= 0:
            raise InvalidArgument([FieldViolation("estimated_tokens", "must be greater than 0")])
        ttl = self._ttl(ttl_s)
        buckets = buckets_for(self._store.levels_for(subject))
        if self._redis_usable():
            try:
                return await self._call(lambda: self._reserve_redis(buckets, estimated_tokens, ttl), deadline)
            except _RedisDown as exc:
                self._mark_down(exc)
        return self._require_fallback().reserve(buckets, estimated_tokens, ttl)

    async def commit(self, reservation_id: str, actual_tokens: int, *, deadline: Deadline | None = None) -> int:
        """Settle with the actual usage; returns tokens refunded (negative: extra tokens charged)."""
        if actual_tokens < 0:
            raise InvalidArgument([FieldViolation("actual_tokens", "must not be negative")])
        if LocalLimiter.owns(reservation_id):
            return self._local_reservations().commit(reservation_id, actual_tokens)
        return await self._settle_redis(reservation_id, "commit", actual_tokens, deadline)

    async def release(self, reservation_id: str, *, deadline: Deadline | None = None) -> None:
        """Give a reservation back in full, request slot included."""
        if LocalLimiter.owns(reservation_id):
            self._local_reservations().release(reservation_id)
            return
        await self._settle_redis(reservation_id, "release", 0, deadline)

    async def usage(self, subject: Subject, *, deadline: Deadline | None = None) -> Usage:
        """Limit, used and remaining for every limited level and kind of the subject."""
        buckets = buckets_for(self._store.levels_for(subject))
        if self._redis_usable():
            try:
                return await self._call(lambda: self._usage_redis(buckets), deadline)
            except _RedisDown as exc:
                self._mark_down(exc)
        return Usage(self._require_fallback().usage(buckets), degraded=True)

    async def sweep_expired(self, *, batch: int = 256, max_batches: int = 40) -> int:
        """Refund reservations past their expiry (Redis and local); returns how many were refunded.

        Safe to run on every replica at once: each batch is one script, and a reservation is
        refunded only by whichever script deletes its record first.
        """
        refunded = self._fallback.sweep() if self._fallback is not None else 0
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

    async def _reserve_redis(self, buckets: Sequence[Bucket], estimated_tokens: int, ttl_s: float) -> Reservation:
        reservation_id = uuid.uuid4().hex
        keys = [b.redis_key(self._prefix) for b in buckets]
        keys += [self._record_key(reservation_id), self._exp_key]
        args: list[Any] = [len(buckets), reservation_id, max(1, round(ttl_s * 1000)), estimated_tokens]
        for b in buckets:
            args += [b.limit, b.period_ms, b.cost(estimated_tokens), int(b.kind.counts_tokens)]
        result = await self._reserve(keys=keys, args=args)
        if int(result[0]) == 1:
            return Reservation(reservation_id, int(result[1]) / 1000)
        failed = [int(i) - 1 for i in result[2]]
        raise quota_exceeded(buckets, failed, int(result[1]) / 1000, estimated_tokens)

    async def _settle_redis(self, reservation_id: str, mode: str, actual_tokens: int,
                            deadline: Deadline | None) -> int:
        # Always tried, even inside the retry window: there is no local alternative for a
        # Redis reservation, and a success is the quickest way to learn Redis is back.
        try:
            result = await self._call(
                lambda: self._settle(keys=[self._record_key(reservation_id), self._exp_key],
                                     args=[reservation_id, mode, actual_tokens]), deadline)
        except _RedisDown as exc:
            self._mark_down(exc)
            raise Unavailable("rate limit store unavailable; the reservation will be refunded when it expires",
                              retry_after_s=max(self._redis_retry_s, 0.1)) from None
        if int(result[0]) == 0:
            raise NotFound("no such reservation (already settled or expired)")
        return int(result[1])

    async def _usage_redis(self, buckets: Sequence[Bucket]) -> Usage:
        if not buckets:
            return Usage([])
        args: list[Any] = []
        for b in buckets:
            args += [b.limit, b.period_ms]
        levels = await self._levels(keys=[b.redis_key(self._prefix) for b in buckets], args=args)
        return Usage([usage_row(b, float(level)) for b, level in zip(buckets, levels, strict=True)])

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
