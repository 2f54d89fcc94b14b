"""Hedged requests (issue 24): when to ask a second backend while the first has sent no token yet.

The generate stage (``generate.py``) runs the race; this module holds what it decides by, across requests:

- the **delay**: per model, a high percentile of its recent first-token latencies times a factor, never under a
  floor. A model that is slow on every request is then hedged only on its slowest ones, not on each; until
  ``min_samples`` latencies are known, ``default_delay_s`` (at least the floor) applies.
- the **budget**: at most ``max_share`` of the requests of the last ``window_s`` seconds are hedged (and at
  least one per window, so that a quiet router can hedge too), so under overload hedging cannot double the
  load.
- **demotion**: a replica that lost a race without having sent a first token is tried after its model's other
  replicas for ``demote_s`` seconds. Being slow once is no breaker fault (the loser is cancelled, it did nothing
  wrong), but a hung replica must not keep receiving first attempts that all wait out the hedge delay.

Nothing here imports gRPC.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HedgePolicy:
    # TOLLGATE_ROUTER_HEDGE_* (services/router/settings.py says why each default is what it is).
    percentile: float = 0.95
    factor: float = 1.5
    floor_s: float = 0.25
    default_delay_s: float = 1.0
    min_samples: int = 20
    # First-token latencies kept per model (the most recent ones).
    samples: int = 256
    max_share: float = 0.1
    window_s: float = 10.0
    demote_s: float = 2.0


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of a non-empty sequence (``q`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


class _Counts:
    """Events over a sliding window, in ten buckets (memory does not grow with the rate)."""

    BUCKETS = 10

    def __init__(self, window_s: float) -> None:
        self._width = window_s / self.BUCKETS
        self._buckets: deque[tuple[int, int]] = deque()  # (bucket number, count)

    def _trim(self, now: float) -> int:
        current = int(now // self._width)
        while self._buckets and self._buckets[0][0] <= current - self.BUCKETS:
            self._buckets.popleft()
        return current

    def add(self, now: float) -> None:
        current = self._trim(now)
        if self._buckets and self._buckets[-1][0] == current:
            self._buckets[-1] = (current, self._buckets[-1][1] + 1)
        else:
            self._buckets.append((current, 1))

    def total(self, now: float) -> int:
        self._trim(now)
        return sum(n for _, n in self._buckets)


class Hedger:
    """The hedging state one router shares across its requests (one event loop: no locks)."""

    def __init__(self, policy: HedgePolicy = HedgePolicy(), *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._latencies: dict[str, deque[float]] = {}
        self._delays: dict[str, float] = {}  # cached per model; dropped when a latency is observed
        self._requests = _Counts(policy.window_s)
        self._hedges = _Counts(policy.window_s)
        self._demoted: dict[str, float] = {}  # target -> monotonic time it is back in its place

    # --- the delay -------------------------------------------------------------------------------------

    def observe_first_token(self, model: str, seconds: float) -> None:
        """An attempt of ``model`` sent its first chunk ``seconds`` after it started."""
        window = self._latencies.get(model)
        if window is None:
            window = self._latencies[model] = deque(maxlen=self.policy.samples)
        window.append(seconds)
        self._delays.pop(model, None)

    def delay(self, model: str, floor_s: float | None = None) -> float:
        """Seconds without a first token after which an attempt of ``model`` is hedged (``floor_s``: the
        route's own floor, else the policy's)."""
        floor = self.policy.floor_s if floor_s is None else floor_s
        learned = self._delays.get(model)
        if learned is None:
            window = self._latencies.get(model)
            if window is None or len(window) < self.policy.min_samples:
                learned = self.policy.default_delay_s
            else:
                learned = quantile(window, self.policy.percentile) * self.policy.factor
            self._delays[model] = learned
        return max(floor, learned)

    # --- the budget ------------------------------------------------------------------------------------

    def note_request(self) -> None:
        """A request reached the generate stage (the budget is a share of these)."""
        self._requests.add(self._clock())

    def try_spend(self) -> bool:
        """Whether one more hedge fits the budget now; if so it is counted."""
        if self.policy.max_share <= 0:
            return False
        now = self._clock()
        allowed = max(1, math.floor(self.policy.max_share * self._requests.total(now)))
        if self._hedges.total(now) >= allowed:
            return False
        self._hedges.add(now)
        return True

    # --- demotion --------------------------------------------------------------------------------------

    def demote(self, target: str) -> None:
        """``target`` lost a race without sending a first token: try it after its peers for a while."""
        if self.policy.demote_s > 0:
            self._demoted[target] = self._clock() + self.policy.demote_s

    def prefer(self, targets: Sequence[str]) -> list[str]:
        """``targets`` in their order, demoted ones moved to the end (still tried, as a last resort)."""
        if not self._demoted:
            return list(targets)
        now = self._clock()
        for target in [t for t, until in self._demoted.items() if until <= now]:
            del self._demoted[target]
        return sorted(targets, key=lambda t: t in self._demoted)
