"""A circuit breaker per downstream, on pybreaker.

Only backend faults count: UNAVAILABLE, INTERNAL and timeouts the backend
caused. A caller's own deadline running out, bad input, quota exhaustion (a
provider's 429 included) and cancellations never open a breaker (DESIGN.md,
"What fails").

It opens on whichever comes first:
- ``fail_max`` consecutive faults (pybreaker's own counter), or
- ``timeout_trip`` consecutive timeouts (``Unavailable`` with reason ``BACKEND_TIMEOUT``: the hop's own
  cap ran out, not the caller's deadline), so a hung dependency opens its breaker after about
  ``timeout_trip`` x the hop's cap (3 x 0.5 s for the side calls) instead of never, or
- an error rate of at least ``error_rate`` over the last ``window_s`` seconds, once
  ``min_calls`` outcomes fall in the window (written here: pybreaker counts only
  consecutive failures). A backend that fails every other call never trips the
  first rule but does trip this one.

After ``reset_timeout_s`` it is half-open: one probe at a time goes through
(pybreaker would let every concurrent caller through), ``success_threshold``
successful probes close it, a failed probe opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pybreaker

from libs.errors import TollgateError, Unavailable

log = logging.getLogger(__name__)

# ErrorInfo reasons that mean "the backend itself is broken".
BACKEND_FAULT_REASONS = frozenset({"UNAVAILABLE", "BACKEND_ERROR", "BACKEND_TIMEOUT", "INTERNAL_ERROR"})
# The reason of a hop that ran out of its own cap (the backend hung), as opposed to the caller's deadline.
BACKEND_TIMEOUT = "BACKEND_TIMEOUT"


class BreakerOpen(Unavailable):
    """The downstream's breaker is open; the call was not attempted."""

    reason = "BREAKER_OPEN"


def is_backend_fault(exc: BaseException) -> bool:
    if isinstance(exc, BreakerOpen):
        return False
    if isinstance(exc, TollgateError):
        return isinstance(exc, Unavailable) and exc.reason in BACKEND_FAULT_REASONS
    # Anything unexpected from the transport (connection reset, ...) is a fault;
    # cancellation is the caller going away, not the backend failing.
    return isinstance(exc, Exception)


def is_backend_timeout(exc: BaseException) -> bool:
    """The backend did not answer within the hop's own cap (a fault; the caller's deadline is not one)."""
    return isinstance(exc, Unavailable) and exc.reason == BACKEND_TIMEOUT


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, on_change: Callable[[str], None]):
        self._on_change = on_change

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        new = str(getattr(new_state, "name", new_state))
        old = str(getattr(old_state, "name", old_state))
        if old != new:  # calls that were in flight when it opened fail afterwards and "reopen" it: not news
            log.warning("breaker %s: %s -> %s", cb.name, old, new)
        self._on_change(new)


class ErrorRateWindow:
    """Outcomes of the last ``window_s`` seconds; the rate rule of the breaker."""

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._failures = 0

    def _trim(self) -> None:
        horizon = self._clock() - self.window_s
        while self._outcomes and self._outcomes[0][0] < horizon:
            _, failed = self._outcomes.popleft()
            self._failures -= failed

    def record(self, failed: bool) -> None:
        self._outcomes.append((self._clock(), failed))
        self._failures += failed
        self._trim()

    def clear(self) -> None:
        self._outcomes.clear()
        self._failures = 0

    @property
    def calls(self) -> int:
        self._trim()
        return len(self._outcomes)

    @property
    def rate(self) -> float:
        self._trim()
        return self._failures / len(self._outcomes) if self._outcomes else 0.0


class Breaker:
    """One downstream's breaker. Use ``with breaker.guard():`` around the awaited call."""

    def __init__(self, name: str, *, fail_max: int = 5, reset_timeout_s: float = 10.0,
                 error_rate: float = 0.5, window_s: float = 10.0, min_calls: int = 10,
                 success_threshold: int = 1, timeout_trip: int = 3):
        self.name = name
        self.timeout_trip = timeout_trip
        # Consecutive backend timeouts. Only a success or another kind of fault resets it: a call the
        # caller cancelled (or a client error) says nothing about whether the backend hangs.
        self._timeouts = 0
        self.error_rate = error_rate
        self.min_calls = min_calls
        self.window = ErrorRateWindow(window_s)
        self._probe_in_flight = False
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=[lambda exc: not is_backend_fault(exc)],
            listeners=[_Listener(self._state_changed)],
            name=name,
            success_threshold=success_threshold,
            # Re-raise the backend's own error on the call that trips the breaker.
            throw_new_error_on_trip=False,
        )

    def _state_changed(self, new_state: str) -> None:
        if new_state == pybreaker.STATE_CLOSED:
            # A fresh start: the failures that opened it must not reopen it on the first blip.
            self.window.clear()
            self._timeouts = 0

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    @property
    def is_open(self) -> bool:
        """Open and still cooling down, or half-open with its probe already out. Once the reset
        timeout has passed the next call is a half-open probe, so callers that skip open breakers
        must not skip this one."""
        state = self.state
        if state == pybreaker.STATE_HALF_OPEN:
            return self._probe_in_flight
        if state != pybreaker.STATE_OPEN:
            return False
        opened_at = self._cb._state_storage.opened_at
        return opened_at is None or datetime.now(UTC) < opened_at + timedelta(seconds=self._cb.reset_timeout)

    def _trip_on_rate(self) -> None:
        if (self.state == pybreaker.STATE_CLOSED and self.window.calls >= self.min_calls
                and self.window.rate >= self.error_rate):
            log.warning("breaker %s: error rate %.0f%% over %d calls in %.0f s", self.name,
                        100 * self.window.rate, self.window.calls, self.window.window_s)
            self._cb.open()

    def _trip_on_timeouts(self, exc: BaseException) -> None:
        if not is_backend_timeout(exc):
            self._timeouts = 0
            return
        self._timeouts += 1
        if self._timeouts >= self.timeout_trip and self.state == pybreaker.STATE_CLOSED:
            log.warning("breaker %s: %d consecutive timeouts", self.name, self._timeouts)
            self._cb.open()

    def probe_now(self) -> None:
        """A health signal (the replica answered its load poll) says the downstream is back: an open breaker
        lets the next call through as its half-open probe now, instead of after the rest of
        ``reset_timeout_s``. A probe that fails opens it again, as any probe does."""
        if self.state == pybreaker.STATE_OPEN:
            log.info("breaker %s: the downstream answers its health poll; next call probes it", self.name)
            self._cb.half_open()

    def record_fault(self, exc: Unavailable) -> None:
        """Count a backend fault the caller detected itself (an inference stream that stalled and was
        cancelled by the request path): the same rules as a fault raised inside :meth:`guard`. Nothing is
        counted while the breaker is open or its probe is out (no call could have been made)."""
        try:
            with self.guard():
                raise exc
        except Unavailable as raised:
            if raised is not exc and not isinstance(raised, BreakerOpen):
                raise

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        if self.state == pybreaker.STATE_HALF_OPEN and self._probe_in_flight:
            raise BreakerOpen(f"{self.name} is unavailable (circuit half-open, probe in flight)")
        try:
            cm = self._cb.calling()
            cm.__enter__()
        except pybreaker.CircuitBreakerError:
            raise BreakerOpen(f"{self.name} is unavailable (circuit open)") from None
        probe = self.state == pybreaker.STATE_HALF_OPEN
        if probe:
            self._probe_in_flight = True
        try:
            yield
        except BaseException as exc:
            fault = is_backend_fault(exc)
            if fault:
                self.window.record(True)
            handled = cm.__exit__(type(exc), exc, exc.__traceback__)
            if probe and isinstance(exc, asyncio.CancelledError):
                # pybreaker takes any excluded outcome as a success and would close the breaker on a probe
                # the caller cancelled (a stalled stream the request path gave up on): it proved nothing.
                self._cb.open()
            if fault:
                self._trip_on_timeouts(exc)
                self._trip_on_rate()
            if not handled:
                raise
        else:
            self._timeouts = 0
            self.window.record(False)
            cm.__exit__(None, None, None)
        finally:
            if probe:
                self._probe_in_flight = False
