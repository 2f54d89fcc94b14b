"""USD budgets: which budgets a request draws from, their calendar windows, thresholds and wording.

A budget is a counter of nano-USD per **UTC calendar window**: a day (00:00:00 to 24:00:00 UTC)
or a month (the 1st 00:00 UTC to the next month's 1st). Unlike the token buckets it does not
refill gradually: it starts from zero when the next window starts. The Lua scripts compute the
window from Redis's clock; :func:`window_at` is the same arithmetic in Python (used by the local
fallback, by reconciliation, and by tests that check the two agree).

Each window's counter is a Redis hash ``{prefix}rl:$:{scope}:{scope_id}:{d|m}:{YYYYMMDD|YYYYMM}``
with ``s`` (committed spend), ``h`` (held by outstanding reservations), ``a``/``al`` (the highest
alert threshold already emitted, and the limit it was computed against). It expires
:data:`WINDOW_KEEP_MS` after its window ends, so settlements that arrive late still land.

Amounts are integers. Redis keeps them as 64-bit integers; the scripts compare them as Lua
doubles, which is exact below 2**53 nano-USD (about 9 million USD per window) — the service
rejects larger amounts (:data:`MAX_NANO_USD`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from services.ratelimit.limits import Level, Period, Scope

MAX_NANO_USD = 2**53 - 1
# Percent thresholds at which an alert event is emitted (once per window each); 100 = exhausted.
ALERT_THRESHOLDS_PCT = (80, 90, 95, 100)
# At or above this share of any budget the reply advises the cheaper tier.
PREFER_CHEAPER_PCT = 95
# A window's counters outlive its end by this much (longer than the longest reservation TTL).
WINDOW_KEEP_MS = 2 * 86_400_000
# ErrorInfo.reason of a reserve rejected (also) because of a budget: retrying soon will not help.
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


@dataclass(frozen=True)
class Window:
    """One UTC calendar window: ``window_id`` is ``YYYYMMDD`` (day) or ``YYYYMM`` (month)."""

    period: Period
    window_id: str
    start_ms: int
    end_ms: int

    @property
    def label(self) -> str:
        """``UTC day 2025-01-31`` / ``UTC month 2025-01``."""
        w = self.window_id
        if self.period is Period.DAILY:
            return f"UTC day {w[:4]}-{w[4:6]}-{w[6:]}"
        return f"UTC month {w[:4]}-{w[4:]}"

    @property
    def resets_at_iso(self) -> str:
        return datetime.fromtimestamp(self.end_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ms(dt: datetime) -> int:
    return int(dt.timestamp()) * 1000


def window_at(period: Period, unix_ms: int) -> Window:
    """The UTC calendar window of ``period`` containing ``unix_ms`` (milliseconds since the epoch)."""
    dt = datetime.fromtimestamp(unix_ms // 1000, tz=UTC)
    if period is Period.DAILY:
        start = datetime(dt.year, dt.month, dt.day, tzinfo=UTC)
        return Window(period, f"{dt.year:04d}{dt.month:02d}{dt.day:02d}", _ms(start), _ms(start + timedelta(days=1)))
    start = datetime(dt.year, dt.month, 1, tzinfo=UTC)
    end = datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=UTC)
    return Window(period, f"{dt.year:04d}{dt.month:02d}", _ms(start), _ms(end))


@functools.lru_cache(maxsize=256)
def window_from_id(period: Period, window_id: str) -> Window:
    """The window a ``YYYYMMDD`` / ``YYYYMM`` id names (as returned by the scripts; cached: every
    reserve names the same few windows)."""
    y, m = int(window_id[:4]), int(window_id[4:6])
    d = int(window_id[6:8]) if period is Period.DAILY else 1
    return window_at(period, _ms(datetime(y, m, d, tzinfo=UTC)))


def threshold(limit: int, pct: int) -> int:
    """The smallest spend that is at least ``pct`` percent of ``limit``: ``ceil(limit * pct / 100)``.

    Integer arithmetic, so "at 95 %" means ``spend * 100 >= limit * 95`` with no rounding.
    """
    return -(-limit * pct // 100)


def budget_key(prefix: str, scope: Scope, scope_id: str, period: Period, window_id: str) -> str:
    return f"{prefix}rl:$:{scope.value}:{scope_id}:{period.short}:{window_id}"


@dataclass(frozen=True)
class BudgetLine:
    """One budget a request draws from: a level's daily or monthly budget."""

    level: Level
    period: Period
    limit: int

    def key_base(self, prefix: str) -> str:
        """The counter's key without the window id (the script appends the window it computes)."""
        return budget_key(prefix, self.level.scope, self.level.scope_id, self.period, "")

    def key(self, prefix: str, window_id: str) -> str:
        return budget_key(prefix, self.level.scope, self.level.scope_id, self.period, window_id)

    @property
    def identity(self) -> tuple[Scope, str, Period]:
        return (self.level.scope, self.level.scope_id, self.period)

    @property
    def name(self) -> str:
        """``team:t1 daily budget``."""
        return f"{self.level.subject} {self.period.value} budget"


def budget_lines_for(levels: Iterable[Level]) -> list[BudgetLine]:
    """Every (level, period) with a budget. All of them are checked: a key's spend counts against
    its own budget, its team's and its org's (and a global one, if set), never only the nearest."""
    return [BudgetLine(level, period, limit) for level in levels for period, limit in level.budgets.active()]


@dataclass(frozen=True)
class BudgetFailure:
    """A budget that refused a reservation: what was in use (spent + held) in which window."""

    line: BudgetLine
    used: int
    window: Window


def describe_failure(failure: BudgetFailure, estimated_cost: int, *, local: bool = False) -> str:
    line, used, window = failure.line, failure.used, failure.window
    where = f"{window.label}; resets at {window.resets_at_iso}"
    if local:
        where += "; this replica's share while the rate limit store is unavailable"
    if used >= line.limit:
        return f"{line.period.value} budget of {line.limit} nano-USD exhausted: {used} used ({where})"
    return (f"{line.period.value} budget of {line.limit} nano-USD: this request's estimated {estimated_cost} "
            f"nano-USD exceeds the {line.limit - used} left ({where})")
