"""LocalLimiter (services/router/pipeline/local_limits.py): window math, carry-over, refusal shape, the bound;
and the snapshot it reads (services/router/control/limit_book.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.chat import Principal
from libs.errors import QuotaExceeded
from services.router.control.limit_book import LevelLimits, LimitBook, LimitSnapshot
from services.router.pipeline.local_limits import BUDGET_EXHAUSTED, LocalLimiter

P = Principal("o1", "t1", "k1")
# 2025-03-14 12:00:00 UTC
T0 = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _book(rates: dict[tuple[str, str], tuple[int, int, int]] | None = None,
          budgets: dict[tuple[str, str], tuple[int, int]] | None = None,
          key_default: tuple[int, int, int] = (0, 0, 0)) -> LimitBook:
    book = LimitBook(None, 1.0)
    book.replace(LimitSnapshot(rates or {}, budgets or {}, key_default))
    return book


def _limiter(share: float = 1.0, clock: Clock | None = None, **kw: object) -> tuple[LocalLimiter, Clock]:
    clock = clock or Clock()
    return LocalLimiter(_book(**kw), share=share, clock=clock), clock  # type: ignore[arg-type]


# --- the snapshot --------------------------------------------------------------------------------

def test_levels_resolve_row_then_wildcard_then_key_default_and_merge_globals() -> None:
    snap = LimitSnapshot({("key", "k1"): (12, 0, 0), ("team", "*"): (0, 500, 0), ("global", "a"): (100, 0, 0),
                          ("global", "b"): (50, 0, 9)},
                         {("org", "o1"): (1000, 0)}, key_default=(7, 0, 0))
    levels = {lv.subject: lv.limits for lv in snap.levels_for("o1", "t1", "k1")}
    assert levels == {"key:k1": LevelLimits(12), "team:t1": LevelLimits(0, 500),
                      "org:o1": LevelLimits(daily_nano_usd=1000), "global": LevelLimits(50, 0, 9)}
    assert {lv.subject: lv.limits for lv in snap.levels_for("o2", "t2", "k2")}["key:k2"] == LevelLimits(7)


def test_an_all_zero_row_is_unlimited_not_the_default() -> None:
    snap = LimitSnapshot({("key", "k1"): (0, 0, 0)}, {}, key_default=(7, 0, 0))
    assert snap.levels_for("o1", "t1", "k1") == []


# --- allowance and window math ----------------------------------------------------------------------

@pytest.mark.parametrize(("limit", "share", "allowance"), [(12, 1.0, 12), (12, 1 / 3, 4), (10, 1 / 3, 3),
                                                           (2, 1 / 4, 1), (1, 0.5, 1)])
def test_allowance_is_the_floor_of_the_share_never_zero(limit: int, share: float, allowance: int) -> None:
    limiter, _ = _limiter(share)
    assert limiter.allowance(limit) == allowance


def test_requests_per_minute_within_the_share_then_refused_then_free_after_the_window() -> None:
    limiter, clock = _limiter(0.5, rates={("key", "k1"): (12, 0, 0)})
    for _ in range(6):
        limiter.admit(P, 10, 0)
        clock.t += 1
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 10, 0)
    # the first admission (T0) leaves the counted window (61 one-second slots) at T0 + 61
    assert err.value.retry_after_s == pytest.approx(T0 + 61 - clock.t)
    clock.t = T0 + 61
    limiter.admit(P, 10, 0)


def test_the_window_counts_conservatively_a_full_period_back() -> None:
    limiter, clock = _limiter(rates={("key", "k1"): (1, 0, 0)})
    limiter.admit(P, 1, 0)
    clock.t += 60.0  # exactly one period later: still counted (the window is one slot longer)
    with pytest.raises(QuotaExceeded):
        limiter.admit(P, 1, 0)
    clock.t += 1.0
    limiter.admit(P, 1, 0)


def test_tokens_per_minute_and_per_day() -> None:
    limiter, clock = _limiter(rates={("key", "k1"): (0, 100, 150)})
    limiter.admit(P, 60, 0)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 60, 0)
    assert [v.description.split()[0] for v in err.value.violations] == ["tokens_per_minute"]
    clock.t += 120
    limiter.admit(P, 60, 0)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 60, 0)  # 120 of 100 a minute is over; 180 of 150 a day too
    assert {v.description.split()[0] for v in err.value.violations} == {"tokens_per_minute", "tokens_per_day"}


def test_a_request_larger_than_the_share_waits_a_full_period() -> None:
    limiter, _ = _limiter(rates={("key", "k1"): (0, 100, 0)})
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 101, 0)
    assert err.value.retry_after_s == 60.0


def test_every_level_counts_and_a_team_limit_binds_all_its_keys() -> None:
    limiter, _ = _limiter(rates={("team", "t1"): (2, 0, 0)})
    limiter.admit(Principal("o1", "t1", "a"), 1, 0)
    limiter.admit(Principal("o1", "t1", "b"), 1, 0)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(Principal("o1", "t1", "c"), 1, 0)
    assert [v.subject for v in err.value.violations] == ["team:t1"]


def test_an_unlimited_principal_is_admitted_and_not_recorded() -> None:
    limiter, _ = _limiter()
    for _ in range(100):
        limiter.admit(P, 10**6, 10**9)
    assert len(limiter) == 0


# --- carry-over ----------------------------------------------------------------------------------

def test_what_the_service_admitted_counts_against_the_local_share() -> None:
    limiter, clock = _limiter(rates={("key", "k1"): (12, 0, 0)})
    for _ in range(12):
        limiter.record(P, 10, 0)  # admitted by the ratelimit service
        clock.t += 1
    with pytest.raises(QuotaExceeded):
        limiter.admit(P, 10, 0)  # the service just failed: no fresh burst


def test_commit_replaces_the_estimate_and_release_gives_the_request_back() -> None:
    limiter, _ = _limiter(rates={("key", "k1"): (2, 100, 0)})
    hold = limiter.record(P, 80, 0)
    limiter.settle(hold, tokens=30, cost=0)
    assert limiter.used("key", "k1")["tokens_per_minute"] == 30
    second = limiter.admit(P, 70, 0)
    limiter.release(second)
    assert limiter.used("key", "k1")["requests_per_minute"] == 1
    limiter.admit(P, 70, 0)


def test_settling_after_the_window_moved_on_changes_nothing() -> None:
    limiter, clock = _limiter(rates={("key", "k1"): (5, 0, 0)})
    hold = limiter.record(P, 1, 0)
    clock.t += 120
    limiter.release(hold)
    assert limiter.used("key", "k1")["requests_per_minute"] == 0


# --- budgets ------------------------------------------------------------------------------------

def test_a_daily_budget_share_is_refused_as_budget_exhausted_until_utc_midnight() -> None:
    limiter, clock = _limiter(0.5, budgets={("org", "o1"): (1000, 0)})
    limiter.admit(P, 1, 300)
    limiter.admit(P, 1, 200)  # 500 = the share
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 1, 0)  # at 100 % of the share nothing is admitted
    exc = err.value
    assert exc.reason == BUDGET_EXHAUSTED
    assert exc.violations[0].subject == "org:o1"
    assert exc.violations[0].description.startswith("daily budget of 1000 nano-USD exhausted")
    assert "resets at 2025-03-15T00:00:00Z" in exc.violations[0].description
    assert exc.retry_after_s == pytest.approx(12 * 3600)
    clock.t += 12 * 3600
    limiter.admit(P, 1, 500)


def test_a_monthly_budget_counts_the_calendar_month() -> None:
    limiter, clock = _limiter(budgets={("key", "k1"): (0, 100)})
    limiter.admit(P, 1, 100)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 1, 1)
    assert err.value.retry_after_s == pytest.approx(datetime(2025, 4, 1, tzinfo=UTC).timestamp() - clock.t)
    clock.t = datetime(2025, 4, 1, tzinfo=UTC).timestamp()
    limiter.admit(P, 1, 100)


def test_december_rolls_over_to_january() -> None:
    clock = Clock(datetime(2025, 12, 31, 23, 0, tzinfo=UTC).timestamp())
    limiter, _ = _limiter(clock=clock, budgets={("key", "k1"): (0, 10)})
    limiter.admit(P, 1, 10)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 1, 1)
    assert err.value.retry_after_s == pytest.approx(3600)


# --- refusal shape --------------------------------------------------------------------------------

def test_a_refusal_names_every_refusing_level_and_kind() -> None:
    limiter, _ = _limiter(rates={("key", "k1"): (1, 0, 0), ("org", "o1"): (1, 0, 0)})
    limiter.admit(P, 1, 0)
    with pytest.raises(QuotaExceeded) as err:
        limiter.admit(P, 1, 0)
    exc = err.value
    assert exc.reason == "QUOTA_EXCEEDED"
    assert [(v.subject, v.description.split()[0]) for v in exc.violations] == [
        ("key:k1", "requests_per_minute"), ("org:o1", "requests_per_minute")]
    assert exc.metadata == {"levels": "key:k1,org:o1", "limiter": "local"}
    assert 0 < exc.retry_after_s <= 61


# --- the bound -----------------------------------------------------------------------------------

@pytest.mark.parametrize("routers", [1, 2, 3, 5])
@pytest.mark.parametrize("before", [0, 5, 12, 20])
def test_mesh_wide_admissions_stay_within_the_stated_bound(routers: int, before: int) -> None:
    """R routers at share 1/R; the service admitted ``before`` requests (all through router 0) in the minute,
    then failed; every router then admits all it can. In any 60 s window: <= S + sum max(0, A_i - S_i)."""
    limit = 12
    clock = Clock()
    book = _book(rates={("key", "k1"): (limit, 0, 0)})
    mesh = [LocalLimiter(book, share=1 / routers, clock=clock) for _ in range(routers)]
    admitted: list[float] = []
    for _ in range(before):
        mesh[0].record(P, 1, 0)
        admitted.append(clock.t)
        clock.t += 0.5
    for _ in range(600):  # five minutes of attempts every 0.5 s on every router
        for router in mesh:
            try:
                router.admit(P, 1, 0)
            except QuotaExceeded:
                continue
            admitted.append(clock.t)
        clock.t += 0.5
    share = max(1, limit // routers)
    bound = before + sum(max(0, share - (before if i == 0 else 0)) for i in range(routers))
    assert bound <= before + limit
    worst = max(sum(1 for t in admitted if start <= t < start + 60) for start in admitted)
    assert worst <= max(bound, limit)
    # steady state during the outage: never more than the routers' shares together a minute
    late = [t for t in admitted if t >= T0 + 120]
    assert max(sum(1 for t in late if s <= t < s + 60) for s in late) <= share * routers <= max(limit, routers)
