"""USD budgets in the Redis limiter: hold/settle, >= semantics, hierarchy, advice, alerts, windows.

Most tests run the scripts on a clock read from a Redis key (``lua.key_clock``) so that calendar
windows, midnight and month ends are exact and deterministic; the scripts are otherwise the
production ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from libs.errors import InvalidArgument, NotFound, QuotaExceeded
from services.ratelimit import lua
from services.ratelimit.buckets import UsageRow
from services.ratelimit.budgets import BUDGET_EXHAUSTED, threshold, window_at
from services.ratelimit.limiter import Limiter
from services.ratelimit.limits import Budgets, Kind, Limits, Period, Scope, StaticLimitStore, Subject

SUBJECT = Subject("o1", "t1", "k1")
MakeLimiter = Callable[..., tuple[Limiter, StaticLimitStore]]


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * 1000  # type: ignore[misc]


@dataclass
class Clocked:
    limiter: Limiter
    store: StaticLimitStore
    redis: aioredis.Redis
    prefix: str
    now_ms: int = 0

    async def at(self, unix_ms: int) -> None:
        self.now_ms = unix_ms
        await self.redis.set(f"{self.prefix}clock", unix_ms)

    async def advance(self, delta_ms: int) -> None:
        await self.at(self.now_ms + delta_ms)

    async def row(self, scope: Scope, period: Period, subject: Subject = SUBJECT) -> UsageRow:
        usage = await self.limiter.usage(subject)
        return next(r for r in usage.rows if r.scope is scope and r.kind is period)

    async def alerts(self) -> list[dict[str, str]]:
        entries = await self.redis.xrange(self.limiter.alerts_stream)
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


@pytest.fixture
def clocked(make_limiter: MakeLimiter, redis_client: aioredis.Redis,
            redis_prefix: str) -> Callable[..., Awaitable[Clocked]]:
    async def make(budgets: dict[tuple[Scope, str], Budgets], rows: dict[tuple[Scope, str], Limits] | None = None,
                   start_ms: int = ms(2025, 3, 14, 12), **kwargs: object) -> Clocked:
        scripts = lua.build(lua.key_clock(f"{redis_prefix}clock"))
        limiter, store = make_limiter(rows, budgets=budgets, scripts=scripts, **kwargs)
        c = Clocked(limiter, store, redis_client, redis_prefix)
        await c.at(start_ms)
        return c

    return make


ClockedFactory = Callable[..., Awaitable[Clocked]]


async def test_hold_commit_and_release_are_exact(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.TEAM, "t1"): Budgets(daily_nano_usd=10_000)})
    a = await c.limiter.reserve(SUBJECT, 100, estimated_cost_nano_usd=3_000)
    b = await c.limiter.reserve(SUBJECT, 100, estimated_cost_nano_usd=2_000)
    row = await c.row(Scope.TEAM, Period.DAILY)
    assert (row.limit, row.used, row.reserved, row.remaining) == (10_000, 5_000, 5_000, 5_000)
    window = window_at(Period.DAILY, c.now_ms)
    assert (row.window_start, row.resets_at) == (window.start_ms / 1000, window.end_ms / 1000)

    await c.limiter.commit(a.reservation_id, 50, actual_cost_nano_usd=1_234)  # refund 1,766
    row = await c.row(Scope.TEAM, Period.DAILY)
    assert (row.used, row.reserved) == (1_234 + 2_000, 2_000)
    await c.limiter.release(b.reservation_id)
    row = await c.row(Scope.TEAM, Period.DAILY)
    assert (row.used, row.reserved, row.remaining) == (1_234, 0, 8_766)
    # Commit may charge more than the estimate (one request's overshoot).
    d = await c.limiter.reserve(SUBJECT, 100, estimated_cost_nano_usd=1_000)
    await c.limiter.commit(d.reservation_id, 100, actual_cost_nano_usd=1_500)
    assert (await c.row(Scope.TEAM, Period.DAILY)).used == 2_734
    with pytest.raises(NotFound):
        await c.limiter.commit(d.reservation_id, 100, actual_cost_nano_usd=1_500)
    assert (await c.row(Scope.TEAM, Period.DAILY)).used == 2_734  # never charged twice


async def test_at_100_percent_rejects_and_no_off_by_one(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)})
    r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=999)
    await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=999)
    # 999 of 1,000: exactly the last nano-USD still fits ...
    with pytest.raises(QuotaExceeded):
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=2)
    last = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    await c.limiter.commit(last.reservation_id, 1, actual_cost_nano_usd=1)
    # ... and at exactly 100 % nothing is admitted, not even a request estimated to cost nothing.
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=0)
    err = info.value
    assert err.reason == BUDGET_EXHAUSTED
    assert [v.subject for v in err.violations] == ["key:k1"]
    assert err.violations[0].description.startswith("daily budget of 1000 nano-USD exhausted: 1000 used")
    assert err.metadata["budgets"] == "key:k1 daily budget"
    assert "budget exhausted: key:k1 daily budget" in err.message


async def test_an_estimate_must_fit_in_what_is_left(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)})
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=600)
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=401)
    assert "this request's estimated 401 nano-USD exceeds the 400 left" in info.value.violations[0].description
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=400)  # fits exactly: used == limit


@pytest.mark.parametrize("scope, scope_id", [(Scope.KEY, "k1"), (Scope.TEAM, "t1"), (Scope.ORG, "o1"),
                                              (Scope.GLOBAL, "")])
@pytest.mark.parametrize("period", [Period.DAILY, Period.MONTHLY])
async def test_each_budget_level_trips_on_its_own(clocked: ClockedFactory, scope: Scope, scope_id: str,
                                                  period: Period) -> None:
    roomy = Budgets(10**12, 10**12)
    budgets = {(Scope.KEY, "k1"): roomy, (Scope.TEAM, "t1"): roomy, (Scope.ORG, "o1"): roomy,
               (Scope.GLOBAL, "*"): roomy}
    tight = 5_000
    budgets[(scope, scope_id or "*")] = Budgets(daily_nano_usd=tight if period is Period.DAILY else 10**12,
                                                monthly_nano_usd=tight if period is Period.MONTHLY else 10**12)
    c = await clocked(budgets, start_ms=ms(2025, 2, 27, 18))  # month ends at 2025-03-01 00:00 UTC
    r = await c.limiter.reserve(SUBJECT, 10, estimated_cost_nano_usd=tight)
    await c.limiter.commit(r.reservation_id, 10, actual_cost_nano_usd=tight)
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 10, estimated_cost_nano_usd=1)
    err = info.value
    subject = "global" if scope is Scope.GLOBAL else f"{scope.value}:{scope_id}"
    assert [v.subject for v in err.violations] == [subject]
    assert err.violations[0].description.startswith(f"{period.value} budget of {tight} nano-USD exhausted")
    assert err.metadata["budgets"] == f"{subject} {period.value} budget"
    # RetryInfo: when that window resets (UTC midnight, or the 1st of the next month).
    reset = ms(2025, 2, 28) if period is Period.DAILY else ms(2025, 3, 1)
    assert err.retry_after_s == (reset - c.now_ms) / 1000
    if scope is not Scope.GLOBAL:  # a subject outside the exhausted level is still admitted
        await c.limiter.reserve(Subject("o2", "t2", "k2"), 10, estimated_cost_nano_usd=1)


async def test_every_level_of_the_hierarchy_is_checked_and_all_or_nothing(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=10_000),
                       (Scope.TEAM, "t1"): Budgets(daily_nano_usd=3_000),
                       (Scope.ORG, "o1"): Budgets(monthly_nano_usd=100_000)})
    sibling = Subject("o1", "t1", "k2")  # same team, own key without a budget
    r = await c.limiter.reserve(sibling, 1, estimated_cost_nano_usd=2_500)
    await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=2_500)
    # k1's own budget is untouched, but the team's is nearly spent: a key cannot skip its team.
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=600)
    assert [v.subject for v in info.value.violations] == ["team:t1"]
    # Nothing was held anywhere by the refused reserve.
    assert (await c.row(Scope.KEY, Period.DAILY)).used == 0
    assert (await c.row(Scope.ORG, Period.MONTHLY)).used == 2_500


async def test_budget_and_rate_limit_refusals_are_reported_together(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.ORG, "o1"): Budgets(daily_nano_usd=100)}, rows={(Scope.KEY, "k1"): Limits(
        requests_per_minute=1)})
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=100)
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    err = info.value
    assert [v.subject for v in err.violations] == ["key:k1", "org:o1"]
    assert err.reason == BUDGET_EXHAUSTED
    assert err.message == "rate limit exceeded: key:k1 requests_per_minute; budget exhausted: org:o1 daily budget"
    # The longest wait wins: the day's end (12 h away), not the request slot (60 s).
    assert err.retry_after_s == 12 * 3600


async def test_prefer_cheaper_from_95_percent_exactly(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.TEAM, "t1"): Budgets(monthly_nano_usd=1_000_001)})
    t95 = threshold(1_000_001, 95)
    assert t95 == 950_001  # 95 % of 1,000,001 is 950,000.95: the next integer
    r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=t95 - 1)
    assert not r.prefer_cheaper
    await c.limiter.release(r.reservation_id)
    r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=t95)  # counted with its own estimate
    assert r.prefer_cheaper
    await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=t95)
    assert (await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=0)).prefer_cheaper


async def test_alerts_once_per_threshold_and_window(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.TEAM, "t1"): Budgets(daily_nano_usd=1_000, monthly_nano_usd=100_000)})

    async def spend(amount: int) -> None:
        r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=0)
        await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=amount)

    # Holds alone alert nothing: alerts are about committed spend.
    held = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=900)
    assert await c.alerts() == []
    await c.limiter.release(held.reservation_id)
    await spend(799)
    assert await c.alerts() == []
    await spend(1)  # 800 = 80 %
    await spend(50)
    await spend(110)  # 960: past 90 and 95 at once -> both, once each
    late = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=0)
    await spend(100)  # 1,060: 100 % (a commit may overshoot its estimate)
    await c.limiter.commit(late.reservation_id, 1, actual_cost_nano_usd=10)  # still 100 %: nothing new
    alerts = await c.alerts()
    assert [(a["scope"], a["scope_id"], a["period"], a["threshold_pct"], a["spent_nano_usd"]) for a in alerts] == [
        ("team", "t1", "daily", "80", "800"), ("team", "t1", "daily", "90", "960"),
        ("team", "t1", "daily", "95", "960"), ("team", "t1", "daily", "100", "1060")]
    assert alerts[0]["window"] == "20250314" and alerts[0]["limit_nano_usd"] == "1000"
    assert int(alerts[0]["resets_at_ms"]) == ms(2025, 3, 15) and int(alerts[0]["at_ms"]) == c.now_ms
    # The next UTC day is a new window: its thresholds alert again.
    await c.at(ms(2025, 3, 15, 0, 0, 1))
    await spend(850)
    alerts = await c.alerts()
    assert [(a["window"], a["threshold_pct"]) for a in alerts[4:]] == [("20250315", "80")]
    # (the monthly budget, 1,920 of 100,000 so far, alerted nothing)
    # A changed limit re-arms the thresholds of the window (for the new limit).
    c.store.set_budgets({(Scope.TEAM, "t1"): Budgets(daily_nano_usd=2_000, monthly_nano_usd=100_000)})
    await spend(1)  # 851 of 2,000: below 80 %
    assert len(await c.alerts()) == 5
    await spend(749)  # 1,600 = 80 % of 2,000
    assert [(a["threshold_pct"], a["limit_nano_usd"]) for a in (await c.alerts())[5:]] == [("80", "2000")]


async def test_daily_window_rolls_over_at_utc_midnight(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=100)}, start_ms=ms(2025, 3, 14, 23, 59, 59))
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=100)
    await c.advance(999)  # 23:59:59.999
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    assert info.value.retry_after_s == 0.001
    await c.advance(1)  # 00:00:00.000: a new day, a fresh budget
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=100)
    row = await c.row(Scope.KEY, Period.DAILY)
    assert (row.used, row.window_start) == (100, ms(2025, 3, 15) / 1000)


@pytest.mark.parametrize("before, after", [
    (ms(2025, 1, 31, 23, 59, 59), ms(2025, 2, 1)),
    (ms(2024, 12, 31, 23, 59, 59), ms(2025, 1, 1)),
    (ms(2024, 2, 29, 23, 59, 59), ms(2024, 3, 1)),  # leap day
])
async def test_monthly_window_rolls_over_on_the_first(clocked: ClockedFactory, before: int, after: int) -> None:
    c = await clocked({(Scope.ORG, "o1"): Budgets(monthly_nano_usd=100)}, start_ms=before)
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=100)
    with pytest.raises(QuotaExceeded) as info:
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    assert info.value.retry_after_s == 1.0
    assert "resets at " + datetime.fromtimestamp(after / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ") in \
        info.value.violations[0].description
    await c.at(after)
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=100)


async def test_commit_after_midnight_settles_the_window_it_was_reserved_in(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)}, start_ms=ms(2025, 3, 14, 23, 59, 50))
    r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=500)
    await c.at(ms(2025, 3, 15, 0, 0, 5))
    await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=300)
    assert (await c.row(Scope.KEY, Period.DAILY)).used == 0  # today: nothing
    await c.at(ms(2025, 3, 14, 23, 59, 59))  # look at yesterday again
    row = await c.row(Scope.KEY, Period.DAILY)
    assert (row.used, row.reserved) == (300, 0)


async def test_expired_reservations_give_their_budget_hold_back(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)})
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1_000, ttl_s=30)
    with pytest.raises(QuotaExceeded):
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    await c.advance(29_999)
    assert await c.limiter.sweep_expired() == 0
    await c.advance(1)
    assert await c.limiter.sweep_expired() == 1
    row = await c.row(Scope.KEY, Period.DAILY)
    assert (row.used, row.reserved) == (0, 0)
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1_000)


async def test_budget_counters_expire_after_their_window(clocked: ClockedFactory, redis_client: aioredis.Redis,
                                                         redis_prefix: str) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)})
    await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=10)
    key = f"{redis_prefix}rl:$:key:k1:d:20250314"
    # Kept for two days after the window ends (TTLs are relative: this test's clock is not Redis's).
    ttl = await redis_client.pttl(key)
    expected = ms(2025, 3, 15) + 2 * 86_400_000 - c.now_ms
    assert expected - 5_000 < ttl <= expected


async def test_reconcile_raises_spend_to_the_ledger_never_lowers_it(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.TEAM, "t1"): Budgets(daily_nano_usd=10_000)})
    r = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1_000)
    await c.limiter.commit(r.reservation_id, 1, actual_cost_nano_usd=700)
    held = await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=200)
    at = (c.now_ms - 3_600_000) / 1000  # any instant of the same UTC day
    lower = await c.limiter.reconcile_spend(Scope.TEAM, "t1", Period.DAILY, at, 500)
    assert (lower.previous_spent, lower.spent, lower.reserved) == (700, 700, 200)
    higher = await c.limiter.reconcile_spend(Scope.TEAM, "t1", Period.DAILY, at, 4_000)
    assert (higher.previous_spent, higher.spent) == (700, 4_000)
    assert higher.window_start == ms(2025, 3, 14) / 1000 and higher.resets_at == ms(2025, 3, 15) / 1000
    row = await c.row(Scope.TEAM, Period.DAILY)
    assert (row.used, row.reserved) == (4_200, 200)
    await c.limiter.release(held.reservation_id)
    with pytest.raises(InvalidArgument):
        await c.limiter.reconcile_spend(Scope.TEAM, "t1", Period.DAILY, at, -1)


async def test_retried_reserve_with_the_same_request_id_is_answered_once(clocked: ClockedFactory) -> None:
    c = await clocked({(Scope.KEY, "k1"): Budgets(daily_nano_usd=1_000)},
                      rows={(Scope.KEY, "k1"): Limits(requests_per_minute=10, tokens_per_minute=1_000)})
    first = await c.limiter.reserve(SUBJECT, 400, estimated_cost_nano_usd=300, request_id="req-1")
    again = await c.limiter.reserve(SUBJECT, 400, estimated_cost_nano_usd=300, request_id="req-1")
    assert (again.reservation_id, again.expires_at, again.replayed) == (first.reservation_id, first.expires_at, True)
    assert not first.replayed
    usage = {r.kind: r for r in (await c.limiter.usage(SUBJECT)).rows}
    assert usage[Period.DAILY].used == 300  # debited once
    assert usage[Kind.REQUESTS_PER_MINUTE].used == 1
    assert usage[Kind.TOKENS_PER_MINUTE].used == 400
    # Another key may use the same request id: ids are per key.
    other = await c.limiter.reserve(Subject("o1", "t1", "k9"), 1, request_id="req-1")
    assert other.reservation_id != first.reservation_id
    # Settled, a retry still answers with the same (now settled) reservation: never a second debit.
    await c.limiter.commit(first.reservation_id, 400, actual_cost_nano_usd=300)
    late = await c.limiter.reserve(SUBJECT, 400, estimated_cost_nano_usd=300, request_id="req-1")
    assert late.reservation_id == first.reservation_id
    assert (await c.row(Scope.KEY, Period.DAILY)).used == 300
    # A refused reserve stores nothing: its retry is judged afresh.
    with pytest.raises(QuotaExceeded):
        await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=800, request_id="req-2")
    c.store.set_budgets({(Scope.KEY, "k1"): Budgets(daily_nano_usd=2_000)})
    assert not (await c.limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=800, request_id="req-2")).replayed


async def test_amounts_beyond_exact_double_range_are_refused(make_limiter: MakeLimiter) -> None:
    limiter, _ = make_limiter()
    with pytest.raises(InvalidArgument):
        await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=2**53)
    with pytest.raises(InvalidArgument):
        await limiter.commit("x", 1, actual_cost_nano_usd=-1)


async def test_budgets_on_redis_time(make_limiter: MakeLimiter) -> None:
    """The production clock: the window is today's UTC day, as this host (Redis's host) sees it."""
    limiter, _ = make_limiter(budgets={(Scope.ORG, "o1"): Budgets(daily_nano_usd=50, monthly_nano_usd=80)})
    r = await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=50)
    assert r.prefer_cheaper
    with pytest.raises(QuotaExceeded) as info:
        await limiter.reserve(SUBJECT, 1, estimated_cost_nano_usd=1)
    now = datetime.now(UTC)
    midnight = window_at(Period.DAILY, int(now.timestamp() * 1000)).end_ms / 1000
    assert abs(info.value.retry_after_s - (midnight - now.timestamp())) < 5
    rows = {r.kind: r for r in (await limiter.usage(SUBJECT)).rows}
    assert (rows[Period.DAILY].used, rows[Period.MONTHLY].used) == (50, 50)
