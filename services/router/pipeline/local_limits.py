"""The router's own limiter, for admission while the ratelimit service is unreachable (stage 5).

Every request this router admits — reserved by the ratelimit service, or admitted here — is
**recorded** per level (key, team, org, global): one request, its estimated tokens and cost, in
time slots (1 s slots for the minute limits, 1 min slots for tokens per day, the UTC calendar day
and month for budgets). Accounting replaces the estimate with the actual figures on commit and
removes the request on release (a cache hit, a failure), as the ratelimit service does.

When the ratelimit service cannot answer (Unavailable, DeadlineExceeded, breaker open),
:meth:`LocalLimiter.admit` decides instead: for each limit L of each level, this router may admit
while its own recorded count in the window, this request included, stays within its **share**
``A = max(1, floor(L * share))`` (``local_limit_share``; default ``1 / router_replicas``). The
count includes what the ratelimit service admitted through this router before it failed, so a key
never gets a fresh burst at the switch-over. The numbers come from :class:`LimitBook`
(``control/limit_book.py``, PostgreSQL, loaded in the background); no I/O here.

Bound (R routers, shares A_i with sum A_i <= L, the default): in any window W of a limit (60 s for
RPM/TPM, the trailing 24 h for TPD, the UTC day/month for budgets) that ends while the limiter is
unreachable, router i admits locally only while its own count stays within A_i, so mesh-wide

    admitted(W) <= S + sum_i max(0, A_i - S_i) <= S + L

where S is what the ratelimit service admitted in W before it failed, S_i the part through router
i. When the failure finds every router at or past its share (the usual case for a key being
limited, e.g. all its traffic through one router), admitted(W) <= max(S, L): no extra at all; at
worst one extra L. The windows are counted conservatively (one slot more than the period).

Switch-back: every request admitted here and served is charged to the ratelimit service
(``local_charges.py``: ``RateLimitService.Charge``, drawn from its buckets without refusing, stopping
at zero, the cost committed to its budgets, once per request id), and admission reserves with the
service again only once the queued charges are delivered (admitting here until then). So when
the service returns its buckets already hold this router's local admissions, not a fresh bucket: in
any window W of a limit L spanning the switch-back, with one router,

    admitted(W) <= L + refill(W) = L + L * |W| / P

what a token bucket of capacity L refilling over its period P allows (the service's admissions before
the outage are in its buckets already; the local ones are drawn at the return as if reserved then;
with one router they always fit in what the bucket held, since its share counts the service's
admissions), up to the charges not yet delivered: those of requests still generating at the
switch-back (queued once they settle: at most the requests in flight) and any dropped (queue
overflow, logged; a router that exits with charges queued). With R routers each delivers its own
charges before it reserves with the service again (and within ``retry_s`` without traffic), so
admissions through the others may miss them until then (charges not yet delivered, as above); and a
charge stops at zero, so local admissions beyond what the service's bucket still held are forgiven,
not carried as debt: admitted(W) <= L + refill(W) when they fit, else at most the outage's bound
plus refill, S + sum_i max(0, A_i - S_i) + refill(W) <= S + L + refill(W).

Charges are conservative: usage in the last period is drawn in full at the return (the service skips
a bucket whose period has passed since the request started), so a key that used its limit during the
outage may wait up to one period for a full bucket, never longer (buckets stop at zero). Budgets are
exact: the cost lands in the window the request started in, as the ledger dates it. Not covered: a
router that restarts during the outage has no record (it may admit its A_i afresh, and its queued
charges are lost); for budgets the record covers only the spend this router saw since it started; a
reservation a hung service made before the router gave up on it (and admitted it here) is charged
twice until the service's sweep refunds it at its expiry (conservative).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from libs.chat import Principal
from libs.errors import QuotaExceeded, QuotaViolation
from services.router.control.limit_book import Level

# ErrorInfo.reason of a refusal by a budget (the ratelimit service's).
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
_PRUNE_EVERY_S = 60.0


class LimitSource(Protocol):
    """Where the limits come from (``control/limit_book.py: LimitBook``); in memory, no I/O."""

    def levels_for(self, org_id: str, team_id: str, key_id: str) -> list[Level]: ...


@dataclass
class _Slots:
    """A sliding-window sum in fixed slots; the window is ``period_s`` plus the current slot."""

    slot_s: float
    period_s: float
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def span(self) -> int:
        return int(self.period_s // self.slot_s)

    def slot(self, at: float) -> int:
        return int(at // self.slot_s)

    def add(self, at: float, amount: int) -> None:
        s = self.slot(at)
        self.counts[s] = self.counts.get(s, 0) + amount

    def adjust(self, at: float, now: float, amount: int) -> None:
        """Change an earlier record, if its slot is still counted."""
        s = self.slot(at)
        if s in self.counts and s >= self.slot(now) - self.span:
            self.counts[s] = max(0, self.counts[s] + amount)

    def total(self, now: float) -> int:
        first = self.slot(now) - self.span
        return sum(v for s, v in self.counts.items() if s >= first)

    def wait_to_free(self, now: float, need: int) -> float:
        """Seconds until ``need`` of the counted amount has left the window."""
        first, freed = self.slot(now) - self.span, 0
        for s in sorted(k for k in self.counts if k >= first):
            freed += self.counts[s]
            if freed >= need:
                return max(0.0, (s + self.span + 1) * self.slot_s - now)
        return self.period_s

    def prune(self, now: float) -> None:
        first = self.slot(now) - self.span
        for s in [k for k in self.counts if k < first]:
            del self.counts[s]


@dataclass
class _Tally:
    """What this router admitted for one level."""

    requests: _Slots = field(default_factory=lambda: _Slots(1.0, 60.0))
    tokens_minute: _Slots = field(default_factory=lambda: _Slots(1.0, 60.0))
    tokens_day: _Slots = field(default_factory=lambda: _Slots(60.0, 86_400.0))
    spend: dict[str, int] = field(default_factory=dict)  # "d20250314" / "m202503" -> nano-USD

    def empty(self, now: float) -> bool:
        return not (self.requests.total(now) or self.tokens_day.total(now) or any(self.spend.values()))


@dataclass(frozen=True)
class LocalHold:
    """One recorded admission, for accounting to settle (``settle`` or ``release``)."""

    levels: tuple[tuple[str, str], ...]
    at: float
    tokens: int
    cost: int
    local: bool = False  # admitted by this limiter (not reserved by the service): charged to it once served


def _windows(at: float) -> tuple[str, str]:
    day = datetime.fromtimestamp(at, UTC)
    return f"d{day:%Y%m%d}", f"m{day:%Y%m}"


def _window_end(window: str) -> float:
    year, month = int(window[1:5]), int(window[5:7])
    if window[0] == "d":
        start = datetime(year, month, int(window[7:9]), tzinfo=UTC)
        return start.timestamp() + 86_400
    return datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC).timestamp()


@dataclass
class _Refusals:
    violations: list[QuotaViolation] = field(default_factory=list)
    wait_s: float = 0.0
    budget: bool = False

    def add(self, level: Level, description: str, wait_s: float, *, budget: bool = False) -> None:
        self.violations.append(QuotaViolation(subject=level.subject, description=description))
        self.wait_s = max(self.wait_s, wait_s)
        self.budget = self.budget or budget

    def error(self) -> QuotaExceeded:
        what = "budget exhausted" if self.budget else "rate limit exceeded"
        subjects = ", ".join(dict.fromkeys(v.subject for v in self.violations))
        error = QuotaExceeded(f"{what} (local limiter, the ratelimit service is unreachable): {subjects}",
                              self.violations, retry_after_s=max(0.001, math.ceil(self.wait_s * 1000) / 1000))
        error.metadata = {"levels": ",".join(dict.fromkeys(v.subject for v in self.violations)),
                          "limiter": "local"}
        if self.budget:
            error.reason = BUDGET_EXHAUSTED
        return error


class LocalLimiter:
    def __init__(self, limits: LimitSource, *, share: float = 1.0, clock: Callable[[], float] = time.time):
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self._limits = limits
        self.share = share
        self._clock = clock
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._pruned_at = clock()

    def allowance(self, limit: int) -> int:
        """This router's share of ``limit`` while it decides alone."""
        return max(1, math.floor(limit * self.share))

    def _levels(self, principal: Principal) -> list[Level]:
        return self._limits.levels_for(principal.org_id, principal.team_id, principal.key_id)

    def record(self, principal: Principal, tokens: int, cost: int) -> LocalHold:
        """Count a request the ratelimit service admitted (so a later outage starts from it)."""
        return self._record(self._levels(principal), tokens, cost)

    def admit(self, principal: Principal, tokens: int, cost: int) -> LocalHold:
        """Admit and record a request within this router's share, or raise QuotaExceeded (RESOURCE_EXHAUSTED,
        one QuotaFailure violation per refusing level and kind, RetryInfo = when the share frees up)."""
        levels = self._levels(principal)
        now = self._clock()
        refusals = _Refusals()
        for level in levels:
            self._check(level, now, tokens, cost, refusals)
        if refusals.violations:
            raise refusals.error()
        return self._record(levels, tokens, cost, local=True)

    def _check(self, level: Level, now: float, tokens: int, cost: int, refusals: _Refusals) -> None:
        tally = self._tallies.get((level.scope, level.scope_id)) or _Tally()
        lim = level.limits
        for kind, limit, slots, amount in (("requests_per_minute", lim.requests_per_minute, tally.requests, 1),
                                           ("tokens_per_minute", lim.tokens_per_minute, tally.tokens_minute, tokens),
                                           ("tokens_per_day", lim.tokens_per_day, tally.tokens_day, tokens)):
            if not limit:
                continue
            share, used = self.allowance(limit), slots.total(now)
            if used + amount > share:
                wait = slots.period_s if amount > share else slots.wait_to_free(now, used + amount - share)
                refusals.add(level, f"{kind} limit {limit} exceeded (this router's local share {share}, "
                                    f"{used} used here)", wait)
        for window, limit in zip(_windows(now), (lim.daily_nano_usd, lim.monthly_nano_usd), strict=True):
            if not limit:
                continue
            share, used = self.allowance(limit), tally.spend.get(window, 0)
            if used >= share or used + cost > share:
                period = "daily" if window[0] == "d" else "monthly"
                end = _window_end(window)
                refusals.add(level, f"{period} budget of {limit} nano-USD exhausted: this router's local share "
                                    f"{share}, {used} used here (UTC window {window[1:]}; resets at "
                                    f"{datetime.fromtimestamp(end, UTC):%Y-%m-%dT%H:%M:%SZ})",
                             end - now, budget=True)

    def _record(self, levels: Sequence[Level], tokens: int, cost: int, *, local: bool = False) -> LocalHold:
        now = self._clock()
        self._maybe_prune(now)
        for level in levels:
            tally = self._tallies.setdefault((level.scope, level.scope_id), _Tally())
            tally.requests.add(now, 1)
            tally.tokens_minute.add(now, tokens)
            tally.tokens_day.add(now, tokens)
            for window in _windows(now):
                tally.spend[window] = tally.spend.get(window, 0) + cost
        return LocalHold(tuple((level.scope, level.scope_id) for level in levels), now, tokens, cost, local)

    def settle(self, hold: LocalHold, *, tokens: int, cost: int) -> None:
        """Accounting committed the request: its actual tokens and cost replace the estimate."""
        self._adjust(hold, requests=0, tokens=tokens - hold.tokens, cost=cost - hold.cost)

    def release(self, hold: LocalHold) -> None:
        """Nothing was generated (a cache hit, a failure): the request no longer counts."""
        self._adjust(hold, requests=-1, tokens=-hold.tokens, cost=-hold.cost)

    def _adjust(self, hold: LocalHold, *, requests: int, tokens: int, cost: int) -> None:
        now = self._clock()
        for identity in hold.levels:
            tally = self._tallies.get(identity)
            if tally is None:
                continue
            tally.requests.adjust(hold.at, now, requests)
            tally.tokens_minute.adjust(hold.at, now, tokens)
            tally.tokens_day.adjust(hold.at, now, tokens)
            for window in _windows(hold.at):
                if window in tally.spend:
                    tally.spend[window] = max(0, tally.spend[window] + cost)

    def used(self, scope: str, scope_id: str) -> dict[str, int]:
        """What this router counts for a level now (requests and tokens in the window, spend this day/month)."""
        now = self._clock()
        tally = self._tallies.get((scope, scope_id)) or _Tally()
        day, month = _windows(now)
        return {"requests_per_minute": tally.requests.total(now), "tokens_per_minute": tally.tokens_minute.total(now),
                "tokens_per_day": tally.tokens_day.total(now), "daily_nano_usd": tally.spend.get(day, 0),
                "monthly_nano_usd": tally.spend.get(month, 0)}

    def _maybe_prune(self, now: float) -> None:
        if now - self._pruned_at < _PRUNE_EVERY_S:
            return
        self._pruned_at = now
        current = set(_windows(now))
        for identity, tally in list(self._tallies.items()):
            for slots in (tally.requests, tally.tokens_minute, tally.tokens_day):
                slots.prune(now)
            tally.spend = {w: v for w, v in tally.spend.items() if w in current}
            if tally.empty(now):
                del self._tallies[identity]

    def __len__(self) -> int:
        return len(self._tallies)
