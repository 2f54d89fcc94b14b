import asyncio
import time

import pytest

from libs.breaker import Breaker, BreakerOpen, is_backend_fault
from libs.errors import DeadlineExceeded, InvalidArgument, Overloaded, QuotaExceeded, Unavailable


@pytest.mark.parametrize(("exc", "fault"), [
    (Unavailable("down", reason="UNAVAILABLE"), True),
    (Unavailable("5xx", reason="BACKEND_ERROR"), True),
    (Unavailable("slow", reason="BACKEND_TIMEOUT"), True),
    (ConnectionResetError(), True),
    (InvalidArgument([]), False),
    (QuotaExceeded("q", [], 1.0), False),
    (Overloaded("busy", 1.0), False),
    (DeadlineExceeded("caller's deadline"), False),
    (Unavailable("no backend", reason="NO_BACKEND"), False),
    (asyncio.CancelledError(), False),
])
def test_only_backend_faults_count(exc: BaseException, fault: bool) -> None:
    assert is_backend_fault(exc) is fault


async def _fail(breaker: Breaker, exc: BaseException) -> None:
    with pytest.raises(type(exc)), breaker.guard():
        await asyncio.sleep(0)
        raise exc


async def test_opens_after_consecutive_faults_and_probes_after_reset() -> None:
    breaker = Breaker("t", fail_max=3, reset_timeout_s=0.2)
    for _ in range(3):
        await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    assert breaker.is_open
    with pytest.raises(BreakerOpen), breaker.guard():
        pass
    time.sleep(0.25)
    assert not breaker.is_open  # cooled down: the next call is a half-open probe
    with breaker.guard():
        await asyncio.sleep(0)
    assert breaker.state == "closed"


async def test_client_errors_and_cancellation_never_open_it() -> None:
    breaker = Breaker("t", fail_max=2, reset_timeout_s=10)
    for exc in (InvalidArgument([]), QuotaExceeded("q", [], 1), DeadlineExceeded("d"), asyncio.CancelledError()):
        for _ in range(3):
            await _fail(breaker, exc)
    assert breaker.state == "closed"


async def _succeed(breaker: Breaker) -> None:
    with breaker.guard():
        await asyncio.sleep(0)


async def test_opens_on_error_rate_over_the_window_without_consecutive_failures() -> None:
    # Every other call fails: never 3 in a row, but a 50 % error rate over 10 calls.
    breaker = Breaker("t", fail_max=3, reset_timeout_s=10, error_rate=0.5, window_s=60, min_calls=10)
    for i in range(9):
        if i % 2:
            await _fail(breaker, Unavailable("down", reason="BACKEND_ERROR"))
        else:
            await _succeed(breaker)
    assert breaker.state == "closed"  # 4 of 9: below min_calls and below the rate
    await _fail(breaker, Unavailable("down", reason="BACKEND_ERROR"))
    assert breaker.is_open  # 5 of 10 = 50 %, with no two failures in a row


async def test_the_rate_rule_ignores_old_outcomes_and_client_errors() -> None:
    breaker = Breaker("t", fail_max=100, reset_timeout_s=10, error_rate=0.5, window_s=0.2, min_calls=4)
    for _ in range(3):
        await _fail(breaker, Unavailable("down", reason="BACKEND_ERROR"))
    time.sleep(0.25)  # those three fall out of the window
    for _ in range(5):
        await _fail(breaker, QuotaExceeded("429", [], 1.0))  # a provider's 429 is not a failure
    await _fail(breaker, Unavailable("down", reason="BACKEND_ERROR"))
    assert breaker.state == "closed" and breaker.window.calls == 1


async def test_half_open_lets_one_probe_through_at_a_time() -> None:
    breaker = Breaker("t", fail_max=1, reset_timeout_s=0.1)
    await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    time.sleep(0.15)
    release = asyncio.Event()

    async def probe() -> None:
        with breaker.guard():
            await release.wait()

    task = asyncio.create_task(probe())
    await asyncio.sleep(0.01)
    assert breaker.state == "half-open" and breaker.is_open
    with pytest.raises(BreakerOpen), breaker.guard():
        pass
    release.set()
    await task
    assert breaker.state == "closed" and not breaker.is_open


async def test_a_failed_probe_opens_it_again() -> None:
    breaker = Breaker("t", fail_max=1, reset_timeout_s=0.1)
    await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    time.sleep(0.15)
    await _fail(breaker, Unavailable("still down", reason="UNAVAILABLE"))
    assert breaker.is_open


def _timeout() -> Unavailable:
    return Unavailable("did not answer in time", reason="BACKEND_TIMEOUT")


async def test_consecutive_timeouts_open_it_before_fail_max() -> None:
    breaker = Breaker("t", fail_max=10, reset_timeout_s=10, timeout_trip=3)
    for _ in range(2):
        await _fail(breaker, _timeout())
    await _fail(breaker, asyncio.CancelledError())  # a caller going away says nothing: the run goes on
    assert breaker.state == "closed"
    await _fail(breaker, _timeout())
    assert breaker.is_open
    t0 = time.monotonic()
    with pytest.raises(BreakerOpen), breaker.guard():
        pass
    assert time.monotonic() - t0 < 0.05


async def test_a_success_or_another_fault_ends_a_run_of_timeouts() -> None:
    breaker = Breaker("t", fail_max=10, reset_timeout_s=10, timeout_trip=3)
    for interruption in (None, Unavailable("down", reason="UNAVAILABLE")):
        for _ in range(2):
            await _fail(breaker, _timeout())
        if interruption is None:
            await _succeed(breaker)
        else:
            await _fail(breaker, interruption)
    await _fail(breaker, _timeout())
    assert breaker.state == "closed"


async def test_a_fault_recorded_from_outside_counts_like_one_raised_inside() -> None:
    breaker = Breaker("t", fail_max=10, reset_timeout_s=10, timeout_trip=2)
    breaker.record_fault(_timeout())
    assert breaker.state == "closed"
    breaker.record_fault(_timeout())
    assert breaker.is_open
    breaker.record_fault(_timeout())  # open: nothing to count, nothing raised
    assert breaker.is_open


async def test_a_cancelled_probe_does_not_close_it() -> None:
    breaker = Breaker("t", fail_max=1, reset_timeout_s=0.05)
    await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    time.sleep(0.06)
    await _fail(breaker, asyncio.CancelledError())  # the probe: the caller gave up on it
    assert breaker.is_open


async def test_probe_now_lets_the_next_call_probe_before_the_reset_timeout() -> None:
    breaker = Breaker("replica", fail_max=1, reset_timeout_s=60.0)
    await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    assert breaker.is_open
    breaker.probe_now()  # its health poll answered
    assert not breaker.is_open and breaker.state == "half-open"
    with breaker.guard():  # the probe succeeds: closed again
        await asyncio.sleep(0)
    assert breaker.state == "closed"
    await _fail(breaker, Unavailable("down", reason="UNAVAILABLE"))
    breaker.probe_now()
    await _fail(breaker, Unavailable("still down", reason="UNAVAILABLE"))  # a failed probe reopens it
    assert breaker.is_open


def test_probe_now_leaves_a_closed_breaker_alone() -> None:
    breaker = Breaker("replica")
    breaker.probe_now()
    assert breaker.state == "closed"
