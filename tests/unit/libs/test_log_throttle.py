import logging

import pytest

from libs.log_throttle import ThrottledLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_interval_then_the_count_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("t.throttle"), 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t.throttle"):
        for _ in range(500):
            throttled.warning("lookup:BREAKER_OPEN", "cache lookup skipped: %s", "BREAKER_OPEN")
            clock.now += 0.01  # 500 requests in 5 s
        throttled.warning("store:BREAKER_OPEN", "cache store skipped: %s", "BREAKER_OPEN")  # another key: at once
        clock.now = 12.0
        throttled.warning("lookup:BREAKER_OPEN", "cache lookup skipped: %s", "BREAKER_OPEN")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cache lookup skipped: BREAKER_OPEN", "cache store skipped: BREAKER_OPEN",
                     "cache lookup skipped: BREAKER_OPEN (499 more like this in the last 12 s)"]


def test_keys_are_bounded() -> None:
    throttled = ThrottledLog(logging.getLogger("t.throttle2"), 10.0, max_keys=8)
    for i in range(1000):
        throttled.warning(f"k{i}", "x")
    assert len(throttled._seen) == 8


def test_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    throttled = ThrottledLog(logging.getLogger("t.throttle3"), 10.0)
    with caplog.at_level(logging.ERROR, "t.throttle3"):
        throttled.warning("k", "x")
    assert not caplog.records and not throttled._seen
