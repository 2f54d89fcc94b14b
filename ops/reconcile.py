"""Reconciliation: ledger spend per scope and period against the ratelimit service's spend counters.

The ledger (PostgreSQL, exact, written after the fact) and the budget counters (Redis, charged
at commit time, used to admit requests) are kept separately on purpose; this compares them
(``tollgate reconcile``) and lists every scope where they disagree by more than a tolerance.

What is compared: for every scope (global, org, team, key) the cost of ledger rows whose
request started in the current UTC calendar day and month, against the committed spend of the
ratelimit service's LIMIT_KIND_BUDGET_DAILY_NANO_USD / LIMIT_KIND_BUDGET_MONTHLY_NANO_USD rows
for that scope (``used - reserved``: what outstanding reservations hold is shown apart, it is
not spend yet). Expected, explainable gaps: requests committed but still on their way through
the usage stream, and requests that straddle midnight; a persistent gap beyond those is a bug
(a lost event, a double charge, or a counter reset).

With ``fix``, counters below the ledger are raised to it (RateLimitService.ReconcileSpend, which
never lowers a counter): the ledger is the exact record, and a limiter that under-counts would
let a budget be overspent. A counter above the ledger is only reported.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from libs.chat import Principal
from ops.report import KeyRow, UsageRow, usd

PERIODS = ("day", "month")
SCOPE_ORDER = {"global": 0, "org": 1, "team": 2, "key": 3}


@dataclass(frozen=True)
class SpendCounter:
    """One budget counter as the ratelimit service reports it."""

    scope: str  # "global" | "org" | "team" | "key"
    scope_id: str  # "" for global
    period: str  # "day" | "month"
    used_nano_usd: int  # committed spend in the window (reservations excluded)
    limit_nano_usd: int
    reserved_nano_usd: int = 0  # held by outstanding reservations, not yet spend
    window_start: datetime | None = None  # the window the service counted, when it says


class LedgerSource(Protocol):
    async def usage_report(self, start: datetime, end: datetime, group_by: list[str]) -> list[UsageRow]: ...

    async def list_keys(self, org_id: str, team_id: str) -> list[KeyRow]: ...


class CounterSource(Protocol):
    async def spend_counters(self, principals: list[Principal]) -> list[SpendCounter]: ...

    async def raise_to_ledger(self, scope: str, scope_id: str, period: str, window_start: datetime,
                              ledger_nano_usd: int) -> int:
        """Raise the counter of that window to at least the ledger's sum; returns the counter after."""
        ...


@dataclass(frozen=True)
class Line:
    scope: str
    scope_id: str
    period: str
    period_start: str  # ISO date of the day or the first of the month
    ledger_nano_usd: int
    counter_nano_usd: int | None  # None: the ratelimit service keeps no counter for this scope
    limit_nano_usd: int | None
    reserved_nano_usd: int = 0
    fixed_to_nano_usd: int | None = None  # the counter after ``fix`` raised it

    @property
    def difference_nano_usd(self) -> int:
        if self.counter_nano_usd is None:
            return 0
        return self.counter_nano_usd - self.ledger_nano_usd


@dataclass(frozen=True)
class Reconciliation:
    at: datetime
    tolerance_nano_usd: int
    lines: list[Line]

    @property
    def differences(self) -> list[Line]:
        return [ln for ln in self.lines
                if ln.counter_nano_usd is not None and abs(ln.difference_nano_usd) > self.tolerance_nano_usd]

    @property
    def compared(self) -> int:
        return sum(1 for ln in self.lines if ln.counter_nano_usd is not None)

    def to_json(self) -> str:
        return json.dumps({
            "at": self.at.isoformat(), "tolerance_nano_usd": self.tolerance_nano_usd, "compared": self.compared,
            "differences": len(self.differences),
            "lines": [{**asdict(ln), "difference_nano_usd": ln.difference_nano_usd,
                       "differs": ln in self.differences} for ln in self.lines]}, indent=2)

    def render_text(self) -> str:
        out = [f"reconciliation at {self.at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC "
               f"(UTC calendar day and month; tolerance {usd(self.tolerance_nano_usd)})"]
        head = (f"{'scope':<40} {'period':<17} {'ledger':>18} {'counter':>18} {'difference':>18} "
                f"{'reserved':>14}")
        out += [head, "-" * len(head)]
        diffs = self.differences
        for ln in self.lines:
            scope = ln.scope if ln.scope == "global" else f"{ln.scope}:{ln.scope_id}"
            counter = usd(ln.counter_nano_usd) if ln.counter_nano_usd is not None else "no counter"
            diff = usd(ln.difference_nano_usd) if ln.counter_nano_usd is not None else ""
            mark = "  <-- DIFFERS" if ln in diffs else ""
            if ln.fixed_to_nano_usd is not None:
                mark += f" (counter raised to {usd(ln.fixed_to_nano_usd)})"
            reserved = usd(ln.reserved_nano_usd) if ln.reserved_nano_usd else ""
            out.append(f"{scope:<40} {ln.period + ' ' + ln.period_start:<17} {usd(ln.ledger_nano_usd):>18} "
                       f"{counter:>18} {diff:>18} {reserved:>14}{mark}")
        out.append(f"{self.compared} counters compared, {len(diffs)} differ"
                   + (" (in-flight requests and midnight crossings explain small, passing gaps)" if diffs else ""))
        return "\n".join(out)


def period_bounds(now: datetime) -> dict[str, tuple[datetime, datetime]]:
    """The current UTC calendar day and month as half-open ranges."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = day.replace(day=1)
    next_month = (month + timedelta(days=32)).replace(day=1)
    return {"day": (day, day + timedelta(days=1)), "month": (month, next_month)}


def roll_up(rows: Iterable[UsageRow]) -> dict[tuple[str, str], int]:
    """Rows grouped by (org, team, key) -> cost per (scope, scope_id) at every level of the hierarchy."""
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        org, team, key = r.group_values
        for scope_key in (("global", ""), ("org", org), ("team", team), ("key", key)):
            totals[scope_key] += r.cost_nano_usd
    return dict(totals)


async def reconcile(ledger: LedgerSource, counters: CounterSource, *, now: datetime | None = None,
                    tolerance_nano_usd: int = 0, fix: bool = False) -> Reconciliation:
    now = now or datetime.now(UTC)
    bounds = period_bounds(now)
    ledger_totals: dict[str, dict[tuple[str, str], int]] = {}
    principals: dict[str, Principal] = {}
    for period, (start, end) in bounds.items():
        rows = await ledger.usage_report(start, end, ["org", "team", "key"])
        ledger_totals[period] = roll_up(rows)
        for r in rows:
            org, team, key = r.group_values
            principals.setdefault(key, Principal(org, team, key))
    # Keys that spent nothing according to the ledger may still have been charged by the limiter
    # (a lost ledger event looks exactly like that), so every active key is asked about.
    for k in await ledger.list_keys("", ""):
        if not k.revoked:
            principals.setdefault(k.key_id, k.principal)
    found: dict[tuple[str, str, str], SpendCounter] = {}
    for c in await counters.spend_counters(sorted(principals.values(), key=lambda p: p.key_id)):
        # A counter of another window (the clock crossed midnight between the two reads) compares nothing.
        if c.period in PERIODS and (c.window_start is None or c.window_start == bounds[c.period][0]):
            found[(c.scope, c.scope_id, c.period)] = c
    lines: list[Line] = []
    for period in PERIODS:
        start = bounds[period][0]
        scopes = {s for s in ledger_totals[period]} | {(s, i) for (s, i, p) in found if p == period}
        for scope, scope_id in scopes:
            counter = found.get((scope, scope_id, period))
            lines.append(Line(scope, scope_id, period, start.date().isoformat(),
                              ledger_totals[period].get((scope, scope_id), 0),
                              counter.used_nano_usd if counter else None, counter.limit_nano_usd if counter else None,
                              counter.reserved_nano_usd if counter else 0))
    lines.sort(key=lambda ln: (PERIODS.index(ln.period), SCOPE_ORDER.get(ln.scope, 9), ln.scope_id))
    result = Reconciliation(now, tolerance_nano_usd, lines)
    if fix:
        for i, ln in enumerate(lines):
            if ln in result.differences and ln.difference_nano_usd < 0:
                after = await counters.raise_to_ledger(ln.scope, ln.scope_id, ln.period, bounds[ln.period][0],
                                                       ln.ledger_nano_usd)
                lines[i] = dataclasses.replace(ln, fixed_to_nano_usd=after)
    return result
