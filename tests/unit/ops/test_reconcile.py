"""Reconciliation arithmetic with in-memory ledger and counter sources."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from libs.chat import Principal
from ops.reconcile import SpendCounter, period_bounds, reconcile, roll_up
from ops.report import KeyRow, UsageRow, usd

NOW = datetime(2026, 3, 15, 13, 30, tzinfo=UTC)


def _row(org: str, team: str, key: str, cost: int) -> UsageRow:
    return UsageRow((org, team, key), 1, 0, 0, 0, cost, 0, 0, 0)


class Ledger:
    def __init__(self, day: list[UsageRow], month: list[UsageRow], keys: tuple[KeyRow, ...] = ()) -> None:
        self.day, self.month, self.keys = day, month, list(keys)
        self.calls: list[tuple[datetime, datetime, list[str]]] = []

    async def usage_report(self, start: datetime, end: datetime, group_by: list[str]) -> list[UsageRow]:
        self.calls.append((start, end, group_by))
        return self.day if (end - start).days == 1 else self.month

    async def list_keys(self, org_id: str, team_id: str) -> list[KeyRow]:
        return list(self.keys)


class Counters:
    def __init__(self, counters: list[SpendCounter]) -> None:
        self.counters = counters
        self.asked: list[Principal] = []
        self.raised: list[tuple[str, str, str, datetime, int]] = []

    async def spend_counters(self, principals: list[Principal]) -> list[SpendCounter]:
        self.asked = principals
        return self.counters

    async def raise_to_ledger(self, scope: str, scope_id: str, period: str, window_start: datetime,
                              ledger_nano_usd: int) -> int:
        self.raised.append((scope, scope_id, period, window_start, ledger_nano_usd))
        return ledger_nano_usd


def test_usd_is_exact() -> None:
    assert usd(450_000) == "$0.00045"
    assert usd(1) == "$0.000000001"
    assert usd(3_000_000_000_000) == "$3,000.00"
    assert usd(-1_500_000_000) == "-$1.50"
    assert usd(0) == "$0.00"


def test_periods_are_utc_calendar_day_and_month() -> None:
    b = period_bounds(NOW)
    assert b["day"] == (datetime(2026, 3, 15, tzinfo=UTC), datetime(2026, 3, 16, tzinfo=UTC))
    assert b["month"] == (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC))
    dec = period_bounds(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))["month"]
    assert dec == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def test_roll_up_sums_every_level_of_the_hierarchy() -> None:
    totals = roll_up([_row("o1", "t1", "k1", 10), _row("o1", "t1", "k2", 5), _row("o1", "t2", "k3", 1),
                      _row("o2", "t3", "k4", 100)])
    assert totals[("global", "")] == 116
    assert totals[("org", "o1")] == 16 and totals[("org", "o2")] == 100
    assert totals[("team", "t1")] == 15 and totals[("key", "k3")] == 1


async def test_matching_books_report_no_difference() -> None:
    rows = [_row("o", "t", "k1", 700), _row("o", "t", "k2", 300)]
    ledger = Ledger(rows, rows)
    counters = Counters([SpendCounter("team", "t", "day", 1_000, 5_000), SpendCounter("key", "k1", "month", 700, 0),
                         SpendCounter("global", "", "month", 1_000, 0)])
    result = await reconcile(ledger, counters, now=NOW)
    assert result.compared == 3 and result.differences == []
    assert {p.key_id for p in counters.asked} == {"k1", "k2"}
    # Ledger scopes without a counter are listed but never count as a difference.
    assert any(ln.scope == "org" and ln.counter_nano_usd is None for ln in result.lines)


async def test_differences_beyond_the_tolerance_are_reported() -> None:
    day = [_row("o", "t", "k1", 1_000)]
    month = [_row("o", "t", "k1", 9_000)]
    # A key the ledger never saw (a lost event?) that the limiter charged.
    silent = KeyRow("k9", Principal("o", "t", "k9"), "k9", revoked=False)
    counters = Counters([SpendCounter("key", "k1", "day", 1_040, 0), SpendCounter("team", "t", "month", 8_000, 0),
                         SpendCounter("key", "k9", "day", 123, 0)])
    result = await reconcile(Ledger(day, month, (silent,)), counters, now=NOW, tolerance_nano_usd=50)
    diffs = {(d.scope, d.scope_id, d.period): d.difference_nano_usd for d in result.differences}
    assert diffs == {("team", "t", "month"): -1_000, ("key", "k9", "day"): 123}  # k1's 40 is within tolerance
    assert "k9" in {p.key_id for p in counters.asked}
    text = result.render_text()
    assert "team:t" in text and "DIFFERS" in text and "2 differ" in text
    data = json.loads(result.to_json())
    assert data["differences"] == 2 and data["compared"] == 3


async def test_fix_raises_only_counters_below_the_ledger() -> None:
    day = [_row("o", "t", "k1", 1_000), _row("o", "t", "k2", 500)]
    counters = Counters([SpendCounter("key", "k1", "day", 600, 0, reserved_nano_usd=300),  # under: raised
                         SpendCounter("key", "k2", "day", 900, 0),  # over: only reported
                         SpendCounter("team", "t", "day", 1_500, 0)])  # equal: untouched
    result = await reconcile(Ledger(day, day), counters, now=NOW, fix=True)
    assert counters.raised == [("key", "k1", "day", datetime(2026, 3, 15, tzinfo=UTC), 1_000)]
    fixed = {(ln.scope_id, ln.period): ln.fixed_to_nano_usd for ln in result.lines}
    assert fixed[("k1", "day")] == 1_000 and fixed[("k2", "day")] is None
    assert len(result.differences) == 2  # still reported: the exit code says something was off
    assert "counter raised to $0.000001" in result.render_text()


async def test_a_counter_of_another_window_is_not_compared() -> None:
    day = [_row("o", "t", "k1", 1_000)]
    yesterday = datetime(2026, 3, 14, tzinfo=UTC)
    counters = Counters([SpendCounter("key", "k1", "day", 5, 0, window_start=yesterday),
                         SpendCounter("key", "k1", "month", 1_000, 0, window_start=datetime(2026, 3, 1, tzinfo=UTC))])
    result = await reconcile(Ledger(day, day), counters, now=NOW)
    assert result.compared == 1 and not result.differences
