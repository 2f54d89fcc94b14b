"""Per-process token buckets used while Redis is unavailable (fail open, but not unlimited).

The same semantics as the Redis limiter (all-or-nothing reserve, refund/charge on commit,
release, expiry sweep), kept in this process's memory on its monotonic clock.

Bound: with ``replicas`` = R (``TOLLGATE_RATELIMIT_REPLICAS``), each replica enforces
``max(1, limit // R)`` per bucket, so while Redis is down the mesh admits at most
``max(limit, R)`` per period per bucket if traffic is spread over all replicas (less if it is
not). Local buckets start full and know nothing of what Redis admitted, so the period in which
Redis goes down (or comes back) can admit up to one extra local capacity. Reservations made
here are known only to this process: settling one on another replica answers NotFound, and
either way it is refunded by this process's sweep when it expires.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from libs.errors import NotFound
from services.ratelimit.buckets import Bucket, Reservation, UsageRow, quota_exceeded, usage_row
from services.ratelimit.limits import Kind, Scope

_Identity = tuple[Scope, str, Kind]


@dataclass
class _LocalBucket:
    tokens: float
    updated: float  # monotonic seconds
    capacity: int
    period_s: float

    def level(self, now: float) -> float:
        return min(float(self.capacity), self.tokens + max(0.0, now - self.updated) * self.capacity / self.period_s)


@dataclass(frozen=True)
class _Debit:
    identity: _Identity
    cost: int
    counts_tokens: bool
    capacity: int
    period_s: float


@dataclass(frozen=True)
class _LocalReservation:
    debits: list[_Debit]
    estimated_tokens: int
    expires_mono: float


class LocalLimiter:
    ID_PREFIX = "local-"

    def __init__(self, *, replicas: int = 1, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._replicas = replicas
        self._clock = clock
        self._wall_clock = wall_clock
        self._buckets: dict[_Identity, _LocalBucket] = {}
        self._reservations: dict[str, _LocalReservation] = {}

    @classmethod
    def owns(cls, reservation_id: str) -> bool:
        return reservation_id.startswith(cls.ID_PREFIX)

    def capacity(self, limit: int) -> int:
        """This replica's share of a limit."""
        return max(1, limit // self._replicas)

    def _level(self, bucket: Bucket, now: float) -> float:
        state = self._buckets.get(bucket.identity)
        return float(self.capacity(bucket.limit)) if state is None else state.level(now)

    def reserve(self, buckets: Sequence[Bucket], estimated_tokens: int, ttl_s: float) -> Reservation:
        now = self._clock()
        have: list[float] = []
        failed: list[int] = []
        wait_s = 0.0
        for i, bucket in enumerate(buckets):
            capacity = self.capacity(bucket.limit)
            tokens = min(self._level(bucket, now), float(capacity))  # the limit may have shrunk
            have.append(tokens)
            cost = bucket.cost(estimated_tokens)
            if tokens < cost:
                failed.append(i)
                period = float(bucket.kind.period_s)
                need = period if cost > capacity else (cost - tokens) * period / capacity
                wait_s = max(wait_s, need)
        if failed:
            raise quota_exceeded(buckets, failed, wait_s, estimated_tokens)
        debits: list[_Debit] = []
        for bucket, tokens in zip(buckets, have, strict=True):
            cost = bucket.cost(estimated_tokens)
            capacity, period_s = self.capacity(bucket.limit), float(bucket.kind.period_s)
            self._buckets[bucket.identity] = _LocalBucket(tokens - cost, now, capacity, period_s)
            debits.append(_Debit(bucket.identity, cost, bucket.kind.counts_tokens, capacity, period_s))
        reservation_id = f"{self.ID_PREFIX}{uuid.uuid4().hex}"
        self._reservations[reservation_id] = _LocalReservation(debits, estimated_tokens, now + ttl_s)
        return Reservation(reservation_id, self._wall_clock() + ttl_s, degraded=True)

    def _take(self, reservation_id: str) -> _LocalReservation:
        found = self._reservations.pop(reservation_id, None)
        if found is None:
            raise NotFound("no such reservation (already settled, expired, or made by another replica)")
        return found

    def _adjust(self, debit: _Debit, delta: int, now: float) -> None:
        state = self._buckets.get(debit.identity)
        if state is None:
            if delta > 0:
                return  # a missing (pruned) bucket is full: nothing to give back
            state = self._buckets[debit.identity] = _LocalBucket(debit.capacity, now, debit.capacity, debit.period_s)
        tokens = state.level(now) + delta
        state.tokens = min(float(state.capacity), tokens) if delta > 0 else tokens
        state.updated = now

    def _settle(self, found: _LocalReservation, *, commit: bool, actual_tokens: int) -> int:
        now = self._clock()
        for debit in found.debits:
            delta = debit.cost
            if commit:
                delta = debit.cost - actual_tokens if debit.counts_tokens else 0
            if delta:
                self._adjust(debit, delta, now)
        return found.estimated_tokens - actual_tokens if commit else found.estimated_tokens

    def commit(self, reservation_id: str, actual_tokens: int) -> int:
        return self._settle(self._take(reservation_id), commit=True, actual_tokens=actual_tokens)

    def release(self, reservation_id: str) -> None:
        self._settle(self._take(reservation_id), commit=False, actual_tokens=0)

    def usage(self, buckets: Sequence[Bucket]) -> list[UsageRow]:
        """Usage of this replica's share (``limit`` is the local capacity, not the configured one)."""
        now = self._clock()
        return [usage_row(b, min(self._level(b, now), float(self.capacity(b.limit))), self.capacity(b.limit))
                for b in buckets]

    def sweep(self) -> int:
        """Refund expired reservations and forget buckets that are full again; returns refunds made."""
        now = self._clock()
        expired = [rid for rid, r in self._reservations.items() if r.expires_mono <= now]
        for rid in expired:
            self._settle(self._reservations.pop(rid), commit=False, actual_tokens=0)
        for identity in [k for k, b in self._buckets.items() if b.level(now) >= b.capacity]:
            del self._buckets[identity]
        return len(expired)

    @property
    def outstanding(self) -> int:
        return len(self._reservations)

