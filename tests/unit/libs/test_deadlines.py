import time

import pytest

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded


def test_no_caller_deadline_gets_the_default_not_infinity() -> None:
    for remaining in (None, 1e12):  # grpc reports "no deadline" as None or a huge number
        d = Deadline.from_remaining(remaining, default_s=5, max_s=60)
        assert not d.from_caller and 4.9 < d.remaining() <= 5


def test_caller_deadline_is_used_and_capped() -> None:
    d = Deadline.from_remaining(2.0, default_s=5, max_s=60)
    assert d.from_caller and 1.9 < d.remaining() <= 2
    capped = Deadline.from_remaining(3600.0, default_s=5, max_s=60)
    assert not capped.from_caller and capped.remaining() <= 60


def test_hop_timeout_keeps_a_margin_and_respects_a_cap() -> None:
    d = Deadline.after(1.0)
    assert 0.85 < d.hop_timeout(0.1) <= 0.9
    assert d.hop_timeout(0.1, cap_s=0.2) == pytest.approx(0.2)


def test_no_hop_starts_without_time_left() -> None:
    d = Deadline.after(0.01)
    time.sleep(0.02)
    assert d.expired()
    with pytest.raises(DeadlineExceeded):
        d.hop_timeout(0.0)
    with pytest.raises(DeadlineExceeded):
        Deadline.after(0.05).hop_timeout(0.1)


def test_a_side_calls_leash_is_not_the_callers_deadline_when_it_binds() -> None:
    caller = Deadline.after(60)
    leash = caller.within(0.5)
    assert not leash.from_caller and leash.remaining() <= 0.5  # the service's own cap: a timeout is a fault
    short = Deadline.after(0.2).within(0.5)
    assert short.from_caller and short.remaining() <= 0.2  # the caller's deadline still binds
    assert not Deadline.from_remaining(None, default_s=60, max_s=600).within(60.5).from_caller
