"""Stage 4, look up the cache (exact, then semantic; the cache service decides), and serve a hit.

Fail open: whatever the cache's problem, the request goes on to a backend. A hit costs nothing; its
saving — what the generation it replaced would have cost at the request's price — is priced here, in
:meth:`LookupStage.serve_hit`.
"""

from __future__ import annotations

import logging

from libs.chat import FinishReason, TokenUsage
from libs.deadlines import Deadline
from libs.errors import TollgateError
from libs.log_throttle import ThrottledLog
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.ports import CacheClient, CachedAnswer, CacheNamespace
from services.router.pipeline.request import RequestState, price_in_force

log = logging.getLogger(__name__)

HIT_RATE_ALPHA = 0.05


class LookupStage:
    def __init__(self, cache: CacheClient, registry: Registry, side_timeout_s: float):
        # Per-request fallbacks: one line per reason per 10 s, with the count held back.
        self._throttled = ThrottledLog(log)
        self._cache = cache
        self._registry = registry
        self._side_timeout_s = side_timeout_s
        # Moving average of hits among lookups: admission reserves before the lookup answers only while
        # most lookups miss.
        self.hit_rate = 0.0

    async def lookup(self, state: RequestState, ns: CacheNamespace, model: ModelEntry, deadline: Deadline, *,
                     allow_stale: bool) -> CachedAnswer | None:
        cmd = state.cmd
        try:
            return await self._cache.lookup(ns, model.name, cmd.messages, cmd.params,
                                            max_age_s=cmd.cache.max_age_s, allow_stale=allow_stale,
                                            exact_only=cmd.cache.no_semantic,
                                            deadline=deadline.within(self._side_timeout_s),
                                            price=price_in_force(self._registry, model, state.started_at))
        except TollgateError as exc:
            # Fail open: whatever the cache's problem, the request is still served.
            self._throttled.warning(f"lookup:{exc.reason}", "cache lookup skipped: %s", exc.reason)
            return None

    async def first_lookup(self, state: RequestState, ns: CacheNamespace, model: ModelEntry, deadline: Deadline, *,
                           allow_stale: bool) -> CachedAnswer | None:
        """The request's first lookup, which also moves the hit rate."""
        hit = await self.lookup(state, ns, model, deadline, allow_stale=allow_stale)
        self.hit_rate += HIT_RATE_ALPHA * ((hit is not None) - self.hit_rate)
        return hit

    @staticmethod
    def serve_hit(state: RequestState, hit: CachedAnswer) -> None:
        """Answer from the cache: no cost, and the saving of the generation it replaced."""
        state.cache_tier = hit.tier
        state.text = [hit.content]
        state.finish = FinishReason.STOP
        state.provider = "cache"
        state.saved_nano_usd = state.price.cost(hit.usage)
        state.usage = TokenUsage(0, 0, 0)
        if hit.stale:
            state.degrade("stale_cache", "the cached answer is past its freshness")

