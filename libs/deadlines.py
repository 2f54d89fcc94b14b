"""Deadline propagation: every hop gets the caller's remaining time minus a margin, always bounded.

A gRPC server's ``context.time_remaining()`` is ``None`` or effectively
infinite when the caller set no deadline; forwarding that would let a hung
backend hold a request forever. :class:`Deadline` is built once per request
at the servicer boundary and asked for each hop's timeout. It imports no gRPC
so domain code can carry it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from libs.errors import DeadlineExceeded

# Anything above this is treated as "the caller set no deadline".
_NO_DEADLINE_THRESHOLD_S = 86_400.0


@dataclass(frozen=True)
class Deadline:
    """An absolute point on the monotonic clock by which the request must be answered."""

    expires_at: float
    # True when the caller chose this deadline; False when it is the service's own cap.
    from_caller: bool

    @classmethod
    def from_remaining(cls, remaining_s: float | None, *, default_s: float, max_s: float) -> Deadline:
        """From ``context.time_remaining()``: the caller's deadline if any, else ``default_s``; at most ``max_s``."""
        now = time.monotonic()
        if remaining_s is None or remaining_s > _NO_DEADLINE_THRESHOLD_S:
            return cls(now + min(default_s, max_s), from_caller=False)
        if remaining_s > max_s:
            return cls(now + max_s, from_caller=False)
        return cls(now + max(0.0, remaining_s), from_caller=True)

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, from_caller=True)

    def within(self, seconds: float) -> Deadline:
        """This deadline, or ``seconds`` from now if that is sooner: a short leash for a side call.

        When the leash is the sooner of the two it is this service's own cap, not the caller's deadline
        (``from_caller`` False): a hop that runs out of it timed out because the backend was slow, which
        counts against its breaker, while running out of the caller's deadline does not.
        """
        leash = time.monotonic() + seconds
        if leash < self.expires_at:
            return Deadline(leash, from_caller=False)
        return Deadline(self.expires_at, self.from_caller)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def hop_timeout(self, margin_s: float, cap_s: float | None = None) -> float:
        """Timeout for one downstream call: remaining time minus ``margin_s``, at most ``cap_s``.

        Raises DeadlineExceeded when nothing useful is left, so no hop is started
        that could not finish in time.
        """
        budget = self.remaining() - margin_s
        if cap_s is not None:
            budget = min(budget, cap_s)
        if budget <= 0.001:
            raise DeadlineExceeded("deadline exceeded before the downstream call could start")
        return budget
