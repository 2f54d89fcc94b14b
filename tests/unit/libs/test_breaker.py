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
