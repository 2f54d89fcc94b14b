"""A circuit breaker per downstream, on pybreaker.

Only backend faults count: UNAVAILABLE, INTERNAL and timeouts the backend
caused. A caller's own deadline running out, bad input, quota exhaustion and
cancellations never open a breaker (DESIGN.md, "What fails").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pybreaker

from libs.errors import TollgateError, Unavailable

log = logging.getLogger(__name__)

# ErrorInfo reasons that mean "the backend itself is broken".
BACKEND_FAULT_REASONS = frozenset({"UNAVAILABLE", "BACKEND_ERROR", "BACKEND_TIMEOUT", "INTERNAL_ERROR"})


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


class _Listener(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: object, new_state: object) -> None:
        log.warning("breaker %s: %s -> %s", cb.name, getattr(old_state, "name", old_state),
                    getattr(new_state, "name", new_state))


class Breaker:
    """One downstream's breaker. Use ``with breaker.guard():`` around the awaited call."""

    def __init__(self, name: str, *, fail_max: int = 5, reset_timeout_s: float = 10.0):
        self.name = name
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            exclude=[lambda exc: not is_backend_fault(exc)],
            listeners=[_Listener()],
            name=name,
            # Re-raise the backend's own error on the call that trips the breaker.
            throw_new_error_on_trip=False,
        )

    @property
    def state(self) -> str:
        return str(self._cb.current_state)

    @property
    def is_open(self) -> bool:
        """Open and still cooling down. Once the reset timeout has passed the next call is a
        half-open probe, so callers that skip open breakers must not skip this one."""
        if self.state != pybreaker.STATE_OPEN:
            return False
        opened_at = self._cb._state_storage.opened_at
        return opened_at is None or datetime.now(UTC) < opened_at + timedelta(seconds=self._cb.reset_timeout)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        try:
            cm = self._cb.calling()
            cm.__enter__()
        except pybreaker.CircuitBreakerError:
            raise BreakerOpen(f"{self.name} is unavailable (circuit open)") from None
        try:
            yield
        except BaseException as exc:
            if not cm.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            cm.__exit__(None, None, None)
