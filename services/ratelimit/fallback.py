"""Per-process limits used while Redis is unavailable (fail open, but not unlimited).

The same semantics as the Redis limiter (all-or-nothing reserve, refund/charge on commit,
release, expiry sweep, budgets, idempotent request ids), kept in this process's memory: token
buckets on its monotonic clock, budget windows on its wall clock (UTC calendar days/months).

Token buckets. L is a bucket's limit per period P, R = ``replicas``
(``TOLLGATE_RATELIMIT_REPLICAS``), c = ``max(1, L // R)`` one replica's local capacity (so
R·c <= max(L, R)).

- Carry-over in (shadowing). While Redis answers, every reservation it admits through this
  process is also drawn from this process's local bucket of the same identity
  (``shadow_reserve``: never refused, the level clamped to [0, c]); commit refunds and charges,
  releases and expiry are mirrored the same way (``shadow_settle``; expiry by ``sweep``, within
  a few sweeps when thousands are outstanding: a late refund only errs on the strict side). A
  replica's shadow sees only its own traffic, against its own share: its level l_i is what c
  would hold had this replica's admissions been counted against c alone. The fallback continues
  from l_i, not from full.
- While Redis is away, over any interval of length T a replica takes at most l_i (its level when
  the interval starts) + c·T/P from a bucket, net of refunds, so the mesh at most
  sum(l_i) + max(L, R)·T/P. (Commits may charge beyond their estimate, as with Redis.)
- Switch-over in: against one exact bucket that held B when Redis went away, the extra is
  sum(l_i) - B. With R = 1 it is 0 (l = B, up to settles whose outcome was lost): no fresh
  burst. With R > 1 it is about 0 when the key's traffic was spread evenly over the replicas; a
  replica's admissions beyond its share are clamped away, so uneven traffic leaves up to
  (R - 1)·c (one replica carried it all, the others keep their shares). A bucket a replica has
  never seen (it started after the traffic, or it dropped the bucket at ``max_buckets``) counts
  as full: only when every replica is new to a key Redis had spent is the extra the old worst
  case, R·c <= max(L, R).
- Carry-over back. What this replica admitted locally (net of refunds, ``take_unsynced_draws``)
  is drawn from the Redis bucket once Redis answers again, before this process's next reserve
  there and by the sweeper; a write that fails is kept and tried again, so it is written once,
  or twice when a write ran but its reply was lost (overcharged, never dropped while this process
  lives). Concurrent reserves wait for it. The draw never refuses and stops at zero, and it is
  min(D_i, ceil(c - l_i)): what was admitted, but not more than the local bucket is still short
  of full (what refilled since is not charged again). With R = 1, Redis is then no fuller than
  the local bucket was: no fresh burst when Redis returns. With R > 1 each replica takes off
  what its local admissions still weigh in its share; stopping at zero forgives admissions
  beyond what Redis would have held (the allowances above) instead of carrying them as debt.
- In sum, no fresh burst: with R = 1 the mesh admits over any interval about what one exact
  bucket would have, outages included; with R > 1 at most the switch-in extra more per outage
  (about 0 with evenly spread traffic, (R - 1)·c with all of it on one replica, R·c only for a
  spent key every replica is new to), and returning is about exact when traffic was spread evenly.

Not covered: a process that exits while Redis is away loses its shadow state and its unsynced
draws (they are never written back), and one that starts during an outage starts full; writes
Redis itself loses in a crash (with ``appendfsync everysec`` about the last second's reserves)
are not restored from the shadows; a settle whose reply was lost (a commit that ran in Redis but
timed out here is refunded here at expiry); a refund owed to Redis for a write-back draw that
stopped at zero there gives back more than that draw took (at most the reservation's estimate);
a hung Redis runs the commands queued while it was stopped when it resumes (reserves that timed
out and were admitted here are then drawn there too until they expire: conservative).

Bound, budgets: each replica remembers the spend it last saw in Redis for each budget window
(``observe``) and admits at most ``(limit - last seen) // R`` of new spend locally (the whole
``limit // R`` for a window it never saw, e.g. after a restart or a rollover during the outage).
So with every replica up to date the mesh stays within the budget; the worst case is one extra
budget per window. Spend committed locally is written back to Redis when it returns
(``take_unsynced``), so the counters, and the budget, account for it afterwards.

Reservations made here are known only to this process: settling one on another replica answers
NotFound, and either way it is refunded by this process's sweep when it expires.

Charges (usage the router admitted without the service, ``Limiter.charge``) taken here while Redis is
away are drawn from the local buckets without refusing and owed to Redis like a local admission,
their cost committed locally and written back with the spend; a charge id is remembered here for a
day (``MAX_CHARGE_IDS`` at most), so a replay to this process draws nothing. Not covered: a replay
that reaches Redis, or another replica, after this process took the charge is drawn again
(overcharged, never under). Charges Redis takes are mirrored into the local buckets
(``shadow_charge``), as reservations are.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from libs.errors import NotFound
from services.ratelimit.buckets import Bucket, Reservation, UsageRow, quota_exceeded, usage_row
from services.ratelimit.budgets import (
    PREFER_CHEAPER_PCT,
    WINDOW_KEEP_MS,
    BudgetFailure,
    BudgetLine,
    Window,
    threshold,
    window_at,
)
from services.ratelimit.limits import Kind, Period, Scope

_Identity = tuple[Scope, str, Kind]
_K = TypeVar("_K")
# A budget window: (scope, scope id, period, window id).
BudgetWindowId = tuple[Scope, str, Period, str]

# Buckets kept for shadowing at most (a bucket lives until it is full again: a day for
# tokens_per_day). Past it, buckets not yet known are not shadowed: they start full, as unseen ones do.
MAX_SHADOW_BUCKETS = 200_000
# Shadows and buckets a sweep looks at, each (a millisecond or two of work).
SWEEP_BATCH = 2_000
# Charge ids taken here remembered at most (the oldest are forgotten first), and for how long.
MAX_CHARGE_IDS = 100_000
CHARGE_ID_TTL_S = 86_400.0


@dataclass(slots=True)
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
    limit: int


@dataclass(frozen=True)
class _LocalReservation:
    debits: list[_Debit]
    estimated_tokens: int
    expires_mono: float
    holds: list[tuple[BudgetWindowId, int]] = field(default_factory=list)  # (window, its end ms)
    estimated_cost: int = 0
    request_key: str = ""
    reservation: Reservation | None = None


@dataclass(frozen=True, slots=True)
class ShadowBucket:
    """What a shadow draw needs of a bucket, worked out once per plan (see ``shadow_plan``)."""

    identity: _Identity
    capacity: int  # this replica's share
    period_s: float
    counts_tokens: bool


@dataclass(slots=True)
class _Shadow:
    """A reservation Redis admitted, as drawn from the local buckets."""

    plan: Sequence[ShadowBucket]
    drawn: list[float]  # per bucket, what the draw took (less than the cost where it stopped at zero)
    estimated_tokens: int
    expires_mono: float


@dataclass(slots=True)
class _Owed:
    amount: int  # drawn locally and not yet from Redis; negative: refunds Redis is owed
    limit: int
    period_ms: int


@dataclass(frozen=True)
class UnsyncedDraw:
    """Tokens (or requests) to draw from a Redis bucket for what the fallback admitted; negative gives back."""

    identity: _Identity
    amount: int
    limit: int  # the configured limit: Redis's capacity, not this replica's share
    period_ms: int


class _Rotation(Generic[_K]):
    """A dict's keys, handed out a batch at a time from a snapshot retaken when it is used up.

    With shadowing, every bucket and Redis reservation in use is in this process's memory:
    looking at all of them on each sweep would stall the event loop for tens of milliseconds.
    A key's turn comes within len(dict) / SWEEP_BATCH sweeps.
    """

    def __init__(self) -> None:
        self._queue: list[_K] = []

    def batch(self, items: dict[_K, Any]) -> list[_K]:
        if not self._queue:
            self._queue = list(items)
        out = self._queue[-SWEEP_BATCH:]
        del self._queue[-SWEEP_BATCH:]
        return out


class LocalLimiter:
    ID_PREFIX = "local-"

    def __init__(self, *, replicas: int = 1, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, max_buckets: int = MAX_SHADOW_BUCKETS):
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self._replicas = replicas
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_buckets = max_buckets
        self._buckets: dict[_Identity, _LocalBucket] = {}
        self._reservations: dict[str, _LocalReservation] = {}
        self._by_request: dict[str, str] = {}
        self._budgets: dict[BudgetWindowId, _LocalBudget] = {}
        # Spend last seen in Redis per budget window, with the window's end (ms) for pruning.
        self._seen: dict[BudgetWindowId, tuple[int, int]] = {}
        # Redis reservations made through this process, mirrored in the local buckets.
        self._shadows: dict[str, _Shadow] = {}
        # Net local draws per bucket not yet written back to Redis.
        self._owed: dict[_Identity, _Owed] = {}
        self._spend_unsynced = False
        # Charge ids taken here -> when they may be forgotten (monotonic), oldest first.
        self._charged: OrderedDict[str, float] = OrderedDict()
        self._shadow_rotation: _Rotation[str] = _Rotation()
        self._bucket_rotation: _Rotation[_Identity] = _Rotation()

    @classmethod
    def owns(cls, reservation_id: str) -> bool:
        return reservation_id.startswith(cls.ID_PREFIX)

    @property
    def replicas(self) -> int:
        return self._replicas

    def capacity(self, limit: int) -> int:
        """This replica's share of a limit."""
        return max(1, limit // self._replicas)

    @property
    def unsynced(self) -> bool:
        """Whether anything admitted here (bucket draws, budget spend) is still to be written to Redis."""
        return self._spend_unsynced or bool(self._owed)

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
        self._spend_unsynced = False
        return out

    def restore_unsynced(self, items: Sequence[tuple[BudgetWindowId, int, int]]) -> None:
        """Put back spend whose write to Redis failed."""
        for wid, amount, end_ms in items:
            self._budgets.setdefault(wid, _LocalBudget(end_ms)).unsynced += amount
            self._spend_unsynced = True

    # -- carry-over between Redis and the local buckets -----------------------------------

    def shadow_plan(self, buckets: Sequence[Bucket]) -> tuple[ShadowBucket, ...]:
        """The buckets as ``shadow_reserve`` takes them (callers cache it with their plan)."""
        return tuple(ShadowBucket(b.identity, self.capacity(b.limit), float(b.kind.period_s), b.kind.counts_tokens)
                     for b in buckets)

    def shadow_reserve(self, reservation_id: str, plan: Sequence[ShadowBucket], estimated_tokens: int,
                       ttl_s: float) -> None:
        """Mirror a reservation Redis admitted: draw it from the local buckets, never refusing.

        So that, should Redis go away, the local buckets go on from what was spent instead of full.
        """
        if not plan:
            return
        now = self._clock()
        drawn: list[float] = []
        states = self._buckets
        for b in plan:
            cost = estimated_tokens if b.counts_tokens else 1
            state = states.get(b.identity)
            if state is None:
                drawn.append(self._shadow_draw(b, cost, now))
                continue
            # _shadow_draw inlined for a bucket already known, the common case: this runs on every reserve.
            capacity = b.capacity
            level = state.tokens + (now - state.updated) * state.capacity / state.period_s
            if level > capacity:
                level = float(capacity)  # full (or the limit shrank)
            taken = float(cost) if level >= cost else max(0.0, level)
            state.tokens, state.updated, state.capacity = level - taken, now, capacity
            drawn.append(taken)
        self._shadows[reservation_id] = _Shadow(plan, drawn, estimated_tokens, now + ttl_s)

    def shadow_settle(self, reservation_id: str, *, commit: bool, actual_tokens: int = 0) -> None:
        """Mirror the settling of a Redis reservation (a release also stands for Redis's own expiry refund)."""
        found = self._shadows.pop(reservation_id, None)
        if found is None:
            return
        now = self._clock()
        over = commit and actual_tokens > found.estimated_tokens
        for bucket, drawn in zip(found.plan, found.drawn, strict=True):
            if not commit:
                self._shadow_give(bucket, drawn, now)
            elif not bucket.counts_tokens:
                continue  # a committed request keeps its slot
            elif over:
                self._shadow_draw(bucket, actual_tokens - found.estimated_tokens, now)
            else:
                # Ends as if `actual_tokens` had been drawn: what the draw did not take is not given back.
                self._shadow_give(bucket, drawn - actual_tokens, now)

    def shadow_charge(self, plan: Sequence[ShadowBucket], requests: int, tokens: int, age_s: float) -> None:
        """Mirror a charge Redis took: draw it from the local buckets, never refusing (buckets whose
        period has passed since the usage, ``age_s`` ago, are not drawn, as in Redis)."""
        now = self._clock()
        for b in plan:
            amount = tokens if b.counts_tokens else requests
            if amount > 0 and age_s < b.period_s:
                self._shadow_draw(b, amount, now)

    def _shadow_draw(self, bucket: ShadowBucket, cost: int, now: float) -> float:
        """Draw from a local bucket, stopping at zero (never refusing); returns what was taken."""
        capacity = bucket.capacity
        state = self._buckets.get(bucket.identity)
        if state is None:
            if len(self._buckets) >= self._max_buckets:
                return 0.0  # no room to remember it: it stays full, like a bucket never seen
            taken = float(min(cost, capacity))
            self._buckets[bucket.identity] = _LocalBucket(capacity - taken, now, capacity, bucket.period_s)
            return taken
        # The level, at most this capacity (the limit may have shrunk); inlined: this runs per reserve.
        level = min(float(capacity), state.tokens + max(0.0, now - state.updated) * state.capacity / state.period_s)
        # Stops at zero, and does not lift a level that local charges took below it.
        taken = min(float(cost), max(0.0, level))
        state.tokens, state.updated, state.capacity = level - taken, now, capacity
        return taken

    def _shadow_give(self, bucket: ShadowBucket, amount: float, now: float) -> None:
        if amount <= 0:
            return
        state = self._buckets.get(bucket.identity)
        if state is None:
            return  # missing means full: nothing to give back
        capacity = bucket.capacity
        level = state.tokens + (now - state.updated) * state.capacity / state.period_s + amount
        state.tokens, state.updated, state.capacity = min(float(capacity), level), now, capacity

    def _owe(self, debit: _Debit, amount: int) -> None:
        owed = self._owed.get(debit.identity)
        if owed is None:
            self._owed[debit.identity] = _Owed(amount, debit.limit, round(debit.period_s * 1000))
        else:
            owed.amount += amount
            owed.limit = debit.limit

    def take_unsynced_draws(self) -> list[UnsyncedDraw]:
        """What this process admitted locally, to be drawn from the Redis buckets; cleared.

        Per bucket the net amount drawn here since the last write-back, but no more than the local
        bucket is still short of full: what has refilled since need not be paid again in Redis.
        """
        now = self._clock()
        out = []
        for identity, owed in self._owed.items():
            amount = owed.amount
            if amount > 0:
                state = self._buckets.get(identity)
                short = 0.0 if state is None else max(0.0, state.capacity - state.level(now))
                amount = min(amount, math.ceil(short))
            if amount:
                out.append(UnsyncedDraw(identity, amount, owed.limit, owed.period_ms))
        self._owed.clear()
        return out

    def restore_unsynced_draws(self, items: Sequence[UnsyncedDraw]) -> None:
        """Put back draws whose write to Redis failed."""
        for item in items:
            owed = self._owed.get(item.identity)
            if owed is None:
                self._owed[item.identity] = _Owed(item.amount, item.limit, item.period_ms)
            else:
                owed.amount += item.amount

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
            debit = _Debit(bucket.identity, cost, bucket.kind.counts_tokens, capacity, period_s, bucket.limit)
            debits.append(debit)
            self._owe(debit, cost)
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
                self._owe(debit, -delta)
        for wid, end_ms in found.holds:
            # Pruned only when nothing was held: a zero-cost estimate whose window is over.
            state = self._budgets.setdefault(wid, _LocalBudget(end_ms))
            state.held -= found.estimated_cost
            state.used -= found.estimated_cost
            if commit:
                state.used += actual_cost
                state.unsynced += actual_cost
                self._spend_unsynced = self._spend_unsynced or actual_cost > 0
        return found.estimated_tokens - actual_tokens if commit else found.estimated_tokens

    def charge(self, buckets: Sequence[Bucket], requests: int, tokens: int, budgets: Sequence[BudgetLine] = (),
               cost: int = 0, *, used_at_s: float | None = None, request_key: str = "") -> bool:
        """Take a charge while Redis is away: drawn from the local buckets without refusing (stopping at
        zero) and owed to Redis, the cost committed to the local budget windows and written back.
        Buckets whose period has passed since ``used_at_s`` are not drawn. Returns True when
        ``request_key`` was charged here before (nothing drawn)."""
        now = self._clock()
        if request_key and self._charged.get(request_key, 0.0) > now:
            return True
        wall = self._wall_clock()
        at = wall if used_at_s is None else min(wall, used_at_s)
        for bucket in buckets:
            amount = tokens if bucket.kind.counts_tokens else requests
            period_s = float(bucket.kind.period_s)
            if amount <= 0 or wall - at >= period_s:
                continue
            capacity = self.capacity(bucket.limit)
            state = self._buckets.get(bucket.identity)
            level = float(capacity) if state is None else min(float(capacity), state.level(now))
            self._buckets[bucket.identity] = _LocalBucket(min(level, max(0.0, level - amount)), now, capacity,
                                                          period_s)
            self._owe(_Debit(bucket.identity, amount, bucket.kind.counts_tokens, capacity, period_s, bucket.limit),
                      amount)
        wall_ms = int(wall * 1000)
        for line in budgets if cost else ():
            window = window_at(line.period, int(at * 1000))
            if window.end_ms + WINDOW_KEEP_MS <= wall_ms:
                continue  # Redis no longer keeps that window either
            state_b = self._budgets.setdefault((*line.identity, window.window_id), _LocalBudget(window.end_ms))
            state_b.used += cost
            state_b.unsynced += cost
            self._spend_unsynced = True
        if request_key:
            self._charged[request_key] = now + CHARGE_ID_TTL_S
            self._charged.move_to_end(request_key)
            while len(self._charged) > MAX_CHARGE_IDS:
                self._charged.popitem(last=False)
        return False

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
        # Redis's sweep refunds its expired reservations; so do their shadows here (not counted:
        # the refund is Redis's). Shadows and buckets are looked at a batch per sweep (see _Rotation).
        for rid in self._shadow_rotation.batch(self._shadows):
            shadow = self._shadows.get(rid)
            if shadow is not None and shadow.expires_mono <= now:
                self.shadow_settle(rid, commit=False)
        # Buckets that are full again are forgotten, so memory follows live traffic only.
        for identity in self._bucket_rotation.batch(self._buckets):
            state = self._buckets.get(identity)
            if state is not None and state.level(now) >= state.capacity:
                del self._buckets[identity]
        now_ms = int(self._wall_clock() * 1000)
        for wid in [w for w, b in self._budgets.items() if b.end_ms <= now_ms and not b.held and not b.unsynced]:
            del self._budgets[wid]
        for wid in [w for w, (_, end_ms) in self._seen.items() if end_ms <= now_ms]:
            del self._seen[wid]
        # Oldest first (one TTL for all): stop at the first that is still remembered.
        while self._charged and next(iter(self._charged.values())) <= now:
            self._charged.popitem(last=False)
        return len(expired)

    @property
    def outstanding(self) -> int:
        return len(self._reservations)
