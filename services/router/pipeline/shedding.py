"""Priority load shedding: under overload free traffic is refused first, then pro, enterprise last.

Pressure is the larger of
- the router's own generations in flight against ``max_in_flight`` (what this router can drive), and
- the inference replicas' pressure (their queue against its bound, from GetLoad polling).

Each tier is admitted while pressure is below its share: free below ``free_share`` (0.5), pro below
``pro_share`` (0.8), enterprise below 1.0. So when a free-tier spike fills half of the capacity, further
free requests get RESOURCE_EXHAUSTED with RetryInfo, and the rest of the capacity stays for pro and
enterprise. A request's own ``priority`` may lower its class (LOW is shed as free) but never raise it.
Cache hits are served before this check: they cost no backend capacity.

Written by hand: it is a few comparisons over numbers the router already has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from libs.errors import Overloaded

TIER_RANK = {"free": 0, "pro": 1, "enterprise": 2}


@dataclass(frozen=True)
class SheddingPolicy:
    # Generations this router runs at once before it refuses even enterprise traffic; 0 disables shedding.
    max_in_flight: int = 256
    free_share: float = 0.5
    pro_share: float = 0.8
    retry_after_s: float = 1.0


def effective_tier(key_tier: str, priority: str) -> str:
    """The key's tier, lowered to free for a LOW-priority request."""
    tier = key_tier if key_tier in TIER_RANK else "pro"
    if priority == "low":
        return "free"
    return tier


class LoadShedder:
    def __init__(self, policy: SheddingPolicy, *, backend_pressure: Callable[[], float] = lambda: 0.0):
        self.policy = policy
        self._backend_pressure = backend_pressure
        self.in_flight = 0
        self.shed: dict[str, int] = {tier: 0 for tier in TIER_RANK}

    def pressure(self) -> float:
        own = self.in_flight / self.policy.max_in_flight if self.policy.max_in_flight else 0.0
        return max(own, self._backend_pressure())

    def _share(self, tier: str) -> float:
        return {"free": self.policy.free_share, "pro": self.policy.pro_share}.get(tier, 1.0)

    def would_admit(self, tier: str) -> bool:
        """Whether ``admit(tier)`` would let a request in right now (no side effect)."""
        return not self.policy.max_in_flight or self.pressure() < self._share(tier)

    @contextlib.contextmanager
    def admit(self, tier: str) -> Iterator[None]:
        """Hold one in-flight slot for a generation, or raise Overloaded (RESOURCE_EXHAUSTED + RetryInfo)."""
        if self.policy.max_in_flight:
            pressure = self.pressure()
            if pressure >= self._share(tier):
                self.shed[tier] = self.shed.get(tier, 0) + 1
                raise Overloaded(f"the gateway is overloaded ({pressure:.0%} of capacity in use) and is shedding "
                                 f"{tier}-tier traffic; retry after the suggested delay", self.policy.retry_after_s)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
