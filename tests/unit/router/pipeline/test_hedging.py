"""Hedger (services/router/pipeline/hedging.py): the adaptive hedge delay, the hedge budget, demotion."""

from __future__ import annotations

import pytest

from services.router.pipeline.hedging import HedgePolicy, Hedger, quantile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _hedger(clock: Clock | None = None, **kw: object) -> Hedger:
    return Hedger(HedgePolicy(**kw), clock=clock or Clock())  # type: ignore[arg-type]


def test_quantile_is_the_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert quantile(values, 0.95) == 95.0 and quantile(values, 1.0) == 100.0 and quantile(values, 0.5) == 50.0
    assert quantile([3.0], 0.95) == 3.0


# --- the delay ----------------------------------------------------------------------------------

def test_with_too_little_history_the_default_delay_applies_never_under_the_floor() -> None:
    hedger = _hedger(floor_s=0.25, default_delay_s=1.0, min_samples=3)
    assert hedger.delay("m") == 1.0
    hedger.observe_first_token("m", 0.01)
    hedger.observe_first_token("m", 0.01)
    assert hedger.delay("m") == 1.0  # two of three samples
    assert _hedger(floor_s=0.5, default_delay_s=0.1).delay("m") == 0.5


def test_the_delay_is_a_percentile_of_recent_latencies_times_the_factor() -> None:
    hedger = _hedger(percentile=0.95, factor=2.0, floor_s=0.01, min_samples=10)
    for i in range(100):
        hedger.observe_first_token("m", 0.01 * (i + 1))  # 0.01 .. 1.00 s
    assert hedger.delay("m") == pytest.approx(0.95 * 2.0)
    assert hedger.delay("other") == HedgePolicy().default_delay_s  # per model


def test_the_delay_adapts_when_the_model_gets_slower_and_faster_again() -> None:
    hedger = _hedger(factor=1.5, floor_s=0.05, min_samples=5, samples=20)
    for _ in range(20):
        hedger.observe_first_token("m", 0.1)
    assert hedger.delay("m") == pytest.approx(0.15)
    for _ in range(20):
        hedger.observe_first_token("m", 2.0)  # a slow real model: hedged only past its own slow tail
    assert hedger.delay("m") == pytest.approx(3.0)
    for _ in range(20):
        hedger.observe_first_token("m", 0.01)  # only the recent samples count; the floor holds
    assert hedger.delay("m") == 0.05


def test_a_routes_floor_replaces_the_policys() -> None:
    hedger = _hedger(floor_s=0.05, min_samples=1, factor=1.0)
    hedger.observe_first_token("m", 0.1)
    assert hedger.delay("m") == pytest.approx(0.1)
    assert hedger.delay("m", floor_s=0.4) == 0.4
    assert hedger.delay("m", floor_s=0.01) == pytest.approx(0.1)


# --- the budget ---------------------------------------------------------------------------------

def test_at_most_the_share_of_the_windows_requests_is_hedged() -> None:
    clock = Clock()
    hedger = _hedger(clock, max_share=0.1, window_s=10)
    for _ in range(50):
        hedger.note_request()
    assert [hedger.try_spend() for _ in range(6)] == [True] * 5 + [False]  # 10 % of 50


def test_a_quiet_window_still_allows_one_hedge() -> None:
    hedger = _hedger(max_share=0.1, window_s=10)
    hedger.note_request()
    assert hedger.try_spend() and not hedger.try_spend()


def test_a_zero_share_never_hedges() -> None:
    hedger = _hedger(max_share=0.0)
    hedger.note_request()
    assert not hedger.try_spend()


def test_the_budget_window_slides() -> None:
    clock = Clock()
    hedger = _hedger(clock, max_share=0.5, window_s=10)
    for _ in range(4):
        hedger.note_request()
    assert [hedger.try_spend() for _ in range(3)] == [True, True, False]
    clock.now += 11  # the requests and hedges of the last window are forgotten
    assert hedger.try_spend() and not hedger.try_spend()  # the minimum of one, nothing more
    for _ in range(4):
        hedger.note_request()
    assert hedger.try_spend() and not hedger.try_spend()  # 2 of 4 in this window, one spent above


# --- demotion -----------------------------------------------------------------------------------

def test_a_demoted_replica_goes_last_until_its_time_is_up() -> None:
    clock = Clock()
    hedger = _hedger(clock, demote_s=2.0)
    assert hedger.prefer(["a", "b", "c"]) == ["a", "b", "c"]
    hedger.demote("a")
    assert hedger.prefer(["a", "b", "c"]) == ["b", "c", "a"]  # still tried, last
    assert hedger.prefer(["c", "a"]) == ["c", "a"]
    clock.now += 2.1
    assert hedger.prefer(["a", "b", "c"]) == ["a", "b", "c"]


def test_no_demotion_when_it_is_off() -> None:
    hedger = _hedger(demote_s=0)
    hedger.demote("a")
    assert hedger.prefer(["a", "b"]) == ["a", "b"]
