"""Degradation tiers with hysteresis: full -> reduced (the cheaper model) -> cache-only.

Signals, both cheap to read on the request path:
- the backend error rate over a sliding window (every inference attempt reports its outcome);
- load pressure in [0, 1+]: the router's own in-flight generations against its capacity, and the
  inference replicas' queues (see :class:`services.router.pipeline.shedding.LoadShedder`).

The level moves **down at once** when a signal crosses its threshold and **up slowly**: one level
at a time, and only after the signals have stayed healthy for ``recover_s`` without a break.
Cache-only would never see a backend recover if nothing reached one, so it lets one probe request
through every ``probe_interval_s``; its outcome feeds the same window.

Written by hand: no library we found does tiered degradation with hysteresis.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from libs.breaker import ErrorRateWindow

# Degraded reasons (services/router/servicer.py maps them to the protobuf enum).
BACKEND_ERRORS = "backend_errors"
LOAD = "load"


class Level(enum.IntEnum):
    FULL = 0
    REDUCED = 1
    CACHE_ONLY = 2


@dataclass(frozen=True)
class DegradationPolicy:
    window_s: float = 10.0
    # Outcomes needed in the window before the error rate is trusted.
    min_samples: int = 10
    reduced_error_rate: float = 0.25
    cache_only_error_rate: float = 0.75
    reduced_pressure: float = 0.9
    recover_s: float = 15.0
    probe_interval_s: float = 1.0


class DegradationController:
    def __init__(self, policy: DegradationPolicy, *, pressure: Callable[[], float] = lambda: 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._pressure = pressure
        self._clock = clock
        self._errors = ErrorRateWindow(policy.window_s, clock=clock)
        self._level = Level.FULL
        self._reason = ""
        self._reason_code = ""
        # Since when the signals have asked for a better level than the current one (None: they have not).
        self._better_since: float | None = None
        self._last_probe = float("-inf")

    def record(self, *, failed: bool) -> None:
        """One backend attempt's outcome (backend faults only; a client error is not an outcome)."""
        self._errors.record(failed)

    def _target(self) -> tuple[Level, str, str]:
        p = self.policy
        rate = self._errors.rate if self._errors.calls >= p.min_samples else 0.0
        if rate >= p.cache_only_error_rate:
            return Level.CACHE_ONLY, BACKEND_ERRORS, f"backend error rate {rate:.0%} over the last {p.window_s:g} s"
        if rate >= p.reduced_error_rate:
            return Level.REDUCED, BACKEND_ERRORS, f"backend error rate {rate:.0%} over the last {p.window_s:g} s"
        pressure = self._pressure()
        if pressure >= p.reduced_pressure:
            return Level.REDUCED, LOAD, f"inference load at {pressure:.0%} of capacity"
        return Level.FULL, "", ""

    def evaluate(self) -> Level:
        """The level for the request at hand (moves the state machine)."""
        target, code, reason = self._target()
        now = self._clock()
        if target >= self._level:
            if target > self._level or reason:
                # Down at once (or still down, with the fresher reason).
                self._level, self._reason_code, self._reason = target, code, reason
            self._better_since = None
            return self._level
        if self._better_since is None:
            self._better_since = now
        elif now - self._better_since >= self.policy.recover_s:
            self._level = Level(self._level - 1)  # up one level, then wait again
            self._better_since = now if self._level > target else None
            if self._level == Level.FULL:
                self._reason = ""
        return self._level

    @property
    def level(self) -> Level:
        return self._level

    @property
    def reason_code(self) -> str:
        """``backend_errors`` | ``load`` (the summary's degraded reason)."""
        return self._reason_code or BACKEND_ERRORS

    @property
    def reason(self) -> str:
        """Why the gateway is below full, for the response (empty at full)."""
        return self._reason if self._level != Level.FULL else ""

    def allow_probe(self) -> bool:
        """In cache-only: whether this request may go to a backend as the interval's probe."""
        now = self._clock()
        if now - self._last_probe >= self.policy.probe_interval_s:
            self._last_probe = now
            return True
        return False

    @property
    def retry_after_s(self) -> float:
        return self.policy.probe_interval_s
