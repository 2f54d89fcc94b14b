"""Per-process limits used while Redis is unavailable (fail open, but not unlimited).

The same semantics as the Redis limiter (all-or-nothing reserve, refund/charge on commit,
release, expiry sweep, budgets, idempotent request ids), kept in this process's memory: token
buckets on its monotonic clock, budget windows on its wall clock (UTC calendar days/months).

Bound, token buckets: with ``replicas`` = R (``TOLLGATE_RATELIMIT_REPLICAS``), each replica
enforces ``max(1, limit // R)`` per bucket, so while Redis is down the mesh admits at most
``max(limit, R)`` per period per bucket if traffic is spread over all replicas (less if it is
not). Switch-over allowance: local buckets start full and know nothing of what Redis admitted,
so the period in which Redis goes down can admit up to one extra local capacity per replica
(about one extra ``limit`` mesh-wide), and so can the period after it comes back (Redis's
buckets refilled meanwhile).

Bound, budgets: each replica remembers the spend it last saw in Redis for each budget window
(``observe``) and admits at most ``(limit - last seen) // R`` of new spend locally (the whole
``limit // R`` for a window it never saw, e.g. after a restart or a rollover during the outage).
So with every replica up to date the mesh stays within the budget; the worst case is one extra
budget per window. Spend committed locally is written back to Redis when it returns
(``take_unsynced``), so the counters, and the budget, account for it afterwards.

Reservations made here are known only to this process: settling one on another replica answers
NotFound, and either way it is refunded by this process's sweep when it expires.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from libs.errors import NotFound
from services.ratelimit.buckets import Bucket, Reservation, UsageRow, quota_exceeded, usage_row
from services.ratelimit.budgets import (
    PREFER_CHEAPER_PCT,
    BudgetFailure,
    BudgetLine,
    Window,
    threshold,
    window_at,
)
from services.ratelimit.limits import Kind, Period, Scope

_Identity = tuple[Scope, str, Kind]
# A budget window: (scope, scope id, period, window id).
BudgetWindowId = tuple[Scope, str, Period, str]


@dataclass
class _LocalBucket:
    tokens: float
    updated: float  # monotonic seconds
    capacity: int
    period_s: float

    def level(self, now: float) -> float:
        return min(float(self.capacity), self.tokens + max(0.0, now - self.updated) * self.capacity / self.period_s)


@dataclass
class _LocalBudget:
    end_ms: int
    used: int = 0  # spent + held here
    held: int = 0
    unsynced: int = 0  # committed here, not yet added to Redis


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
    holds: list[tuple[BudgetWindowId, int]] = field(default_factory=list)  # (window, its end ms)
    estimated_cost: int = 0
    request_key: str = ""
    reservation: Reservation | None = None


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
        self._by_request: dict[str, str] = {}
        self._budgets: dict[BudgetWindowId, _LocalBudget] = {}
        # Spend last seen in Redis per budget window, with the window's end (ms) for pruning.
        self._seen: dict[BudgetWindowId, tuple[int, int]] = {}

    @classmethod
    def owns(cls, reservation_id: str) -> bool:
        return reservation_id.startswith(cls.ID_PREFIX)

    @property
    def replicas(self) -> int:
        return self._replicas

    def capacity(self, limit: int) -> int:
        """This replica's share of a limit."""
        return max(1, limit // self._replicas)

    # -- budgets --------------------------------------------------------------------------

    def observe(self, line: BudgetLine, window: Window, used: int) -> None:
        """Remember what Redis said a budget window holds (spent + held), for the local share."""
        self._seen[(*line.identity, window.window_id)] = (used, window.end_ms)

    def _window(self, line: BudgetLine) -> tuple[BudgetWindowId, Window]:
        window = window_at(line.period, int(self._wall_clock() * 1000))
        return (*line.identity, window.window_id), window

    def _share(self, line: BudgetLine, wid: BudgetWindowId) -> tuple[int, int]:
        """(spend Redis last reported, this replica's share of what was left)."""
        base = self._seen.get(wid, (0, 0))[0]
        return base, max(0, line.limit - base) // self._replicas

    def take_unsynced(self) -> list[tuple[BudgetWindowId, int, int]]:
        """Spend committed locally and not yet in Redis: (window, amount, window end ms); cleared."""
        out = []
        for wid, b in self._budgets.items():
            if b.unsynced:
                out.append((wid, b.unsynced, b.end_ms))
                b.unsynced = 0
        return out

    def restore_unsynced(self, items: Sequence[tuple[BudgetWindowId, int, int]]) -> None:
        """Put back spend whose write to Redis failed."""
        for wid, amount, end_ms in items:
            self._budgets.setdefault(wid, _LocalBudget(end_ms)).unsynced += amount

    # -- reserve / settle -----------------------------------------------------------------

    def _level(self, bucket: Bucket, now: float) -> float:
        state = self._buckets.get(bucket.identity)
        return float(self.capacity(bucket.limit)) if state is None else state.level(now)

    def reserve(self, buckets: Sequence[Bucket], estimated_tokens: int, ttl_s: float,
                budgets: Sequence[BudgetLine] = (), estimated_cost: int = 0, request_key: str = "") -> Reservation:
        if request_key:
            previous = self._reservations.get(self._by_request.get(request_key, ""))
            if previous is not None and previous.reservation is not None:
                r = previous.reservation
                return Reservation(r.reservation_id, r.expires_at, degraded=True, prefer_cheaper=r.prefer_cheaper,
                                   replayed=True)
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
        budget_failures: list[BudgetFailure] = []
        windows: list[tuple[BudgetWindowId, Window]] = []
        prefer_cheaper = False
        now_ms = int(self._wall_clock() * 1000)
        for line in budgets:
            wid, window = self._window(line)
            windows.append((wid, window))
            base, share = self._share(line, wid)
            used = self._budgets[wid].used if wid in self._budgets else 0
            if used >= share or used + estimated_cost > share:
                budget_failures.append(BudgetFailure(line, base + used, window))
                wait_s = max(wait_s, (window.end_ms - now_ms) / 1000)
            # The other replicas are assumed to spend at this one's pace.
            elif base + (used + estimated_cost) * self._replicas >= threshold(line.limit, PREFER_CHEAPER_PCT):
                prefer_cheaper = True
        if failed or budget_failures:
            raise quota_exceeded(buckets, failed, wait_s, estimated_tokens, budget_failures, estimated_cost,
                                 local=True)
        debits: list[_Debit] = []
        for bucket, tokens in zip(buckets, have, strict=True):
            cost = bucket.cost(estimated_tokens)
            capacity, period_s = self.capacity(bucket.limit), float(bucket.kind.period_s)
            self._buckets[bucket.identity] = _LocalBucket(tokens - cost, now, capacity, period_s)
            debits.append(_Debit(bucket.identity, cost, bucket.kind.counts_tokens, capacity, period_s))
        for wid, window in windows:
            state = self._budgets.setdefault(wid, _LocalBudget(window.end_ms))
            state.used += estimated_cost
            state.held += estimated_cost
        reservation_id = f"{self.ID_PREFIX}{uuid.uuid4().hex}"
        reservation = Reservation(reservation_id, self._wall_clock() + ttl_s, degraded=True,
                                  prefer_cheaper=prefer_cheaper)
        self._reservations[reservation_id] = _LocalReservation(
            debits, estimated_tokens, now + ttl_s, [(wid, w.end_ms) for wid, w in windows], estimated_cost, request_key,
            reservation)
        if request_key:
            self._by_request[request_key] = reservation_id
        return reservation

    def _take(self, reservation_id: str) -> _LocalReservation:
        found = self._reservations.pop(reservation_id, None)
        if found is None:
            raise NotFound("no such reservation (already settled, expired, or made by another replica)")
        if found.request_key:
            self._by_request.pop(found.request_key, None)
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

    def _settle(self, found: _LocalReservation, *, commit: bool, actual_tokens: int, actual_cost: int = 0) -> int:
        now = self._clock()
        for debit in found.debits:
            delta = debit.cost
            if commit:
                delta = debit.cost - actual_tokens if debit.counts_tokens else 0
            if delta:
                self._adjust(debit, delta, now)
        for wid, end_ms in found.holds:
            # Pruned only when nothing was held: a zero-cost estimate whose window is over.
            state = self._budgets.setdefault(wid, _LocalBudget(end_ms))
            state.held -= found.estimated_cost
            state.used -= found.estimated_cost
            if commit:
                state.used += actual_cost
                state.unsynced += actual_cost
        return found.estimated_tokens - actual_tokens if commit else found.estimated_tokens

    def commit(self, reservation_id: str, actual_tokens: int, actual_cost: int = 0) -> int:
        return self._settle(self._take(reservation_id), commit=True, actual_tokens=actual_tokens,
                            actual_cost=actual_cost)

    def release(self, reservation_id: str) -> None:
        self._settle(self._take(reservation_id), commit=False, actual_tokens=0)

    def usage(self, buckets: Sequence[Bucket], budgets: Sequence[BudgetLine] = ()) -> list[UsageRow]:
        """Usage of this replica's share (``limit`` is the local capacity, not the configured one).

        Budget rows show the configured limit, and as used what Redis last reported plus what
        this replica added since.
        """
        now = self._clock()
        rows = [usage_row(b, min(self._level(b, now), float(self.capacity(b.limit))), self.capacity(b.limit))
                for b in buckets]
        for line in budgets:
            wid, window = self._window(line)
            base = self._seen.get(wid, (0, 0))[0]
            state = self._budgets.get(wid)
            used = base + (state.used if state else 0)
            rows.append(UsageRow(line.level.scope, line.level.scope_id, line.period, line.limit, used=used,
                                 remaining=max(0, line.limit - used), reserved=state.held if state else 0,
                                 window_start=window.start_ms / 1000, resets_at=window.end_ms / 1000))
        return rows

    def sweep(self) -> int:
        """Refund expired reservations and forget state that no longer matters; returns refunds made."""
        now = self._clock()
        expired = [rid for rid, r in self._reservations.items() if r.expires_mono <= now]
        for rid in expired:
            self._settle(self._take(rid), commit=False, actual_tokens=0)
        for identity in [k for k, b in self._buckets.items() if b.level(now) >= b.capacity]:
            del self._buckets[identity]
        now_ms = int(self._wall_clock() * 1000)
        for wid in [w for w, b in self._budgets.items() if b.end_ms <= now_ms and not b.held and not b.unsynced]:
            del self._budgets[wid]
        for wid in [w for w, (_, end_ms) in self._seen.items() if end_ms <= now_ms]:
            del self._seen[wid]
        return len(expired)

    @property
    def outstanding(self) -> int:
        return len(self._reservations)
