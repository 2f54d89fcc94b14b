"""The response cache: tiers asked in order, what is worth storing, per-tenant statistics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from libs.chat import TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded
from services.cache.domain import (
    CacheHit,
    CacheKey,
    CacheStats,
    Counter,
    InvalidationScope,
    LookupOptions,
    Namespace,
    NamespaceStats,
    NewEntry,
    TierHealth,
    TierKind,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class CacheTier(Protocol):
    """One way of answering from earlier generations (exact now; semantic next)."""

    @property
    def kind(self) -> TierKind: ...

    async def lookup(self, key: CacheKey, options: LookupOptions, now: float) -> CacheHit | None: ...

    async def store(self, key: CacheKey, entry: NewEntry, now: float) -> str:
        """Store and return the entry id."""
        ...

    async def invalidate(self, scope: InvalidationScope) -> int: ...

    def health(self) -> TierHealth: ...


class StatsStore(Protocol):
    async def incr_stats(self, tenant_id: str, counts: Mapping[str, int], namespace: Namespace | None = None) -> None:
        ...

    async def read_stats(self, tenant_id: str) -> dict[str, int]:
        """Counters of one tenant, or summed over all tenants for ""."""
        ...

    async def read_namespace_stats(self, tenant_id: str) -> list[tuple[Namespace, dict[str, int]]]: ...


_HIT_COUNTER = {TierKind.EXACT: Counter.EXACT_HITS, TierKind.SEMANTIC: Counter.SEMANTIC_HITS}
_MISS_COUNTER = {TierKind.EXACT: Counter.EXACT_MISSES, TierKind.SEMANTIC: Counter.SEMANTIC_MISSES}


class ResponseCache:
    """Lookup / store / invalidate / stats over the tiers, in the order given (cheapest first).

    Cacheability policy (deterministic requests only, no-store, ...) is the router's:
    this stores what it is given, provided it is worth a slot.
    """

    def __init__(self, tiers: Sequence[CacheTier], stats: StatsStore, *, default_ttl_s: int, max_ttl_s: int,
                 max_entry_bytes: int, clock: Callable[[], float] = time.time,
                 ttl_for: Callable[[Namespace], int | None] = lambda _ns: None):
        if not tiers:
            raise ValueError("at least one cache tier is required")
        self._tiers = list(tiers)
        self._stats = stats
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s
        self._max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._ttl_for = ttl_for
        self._background: set[asyncio.Task[None]] = set()

    async def lookup(self, key: CacheKey, options: LookupOptions = LookupOptions(),
                     deadline: Deadline | None = None) -> CacheHit | None:
        now = self._clock()
        counts: dict[str, int] = {}
        try:
            for tier in self._tiers:
                if options.exact_only and tier.kind is not TierKind.EXACT:
                    continue
                hit = await _bounded(_budget(deadline), tier.lookup(key, options, now))
                if hit is not None:
                    counts[_HIT_COUNTER[hit.tier]] = 1
                    if options.price is not None:
                        counts[Counter.SAVED_NANO_USD] = options.price.cost(hit.usage)
                    return hit
                counts[_MISS_COUNTER[tier.kind]] = 1
            counts[Counter.MISSES] = 1
            return None
        finally:
            if counts:
                self._count_later(key.namespace, counts)

    async def store(self, key: CacheKey, content: str, usage: TokenUsage, ttl_s: int = 0,
                    deadline: Deadline | None = None) -> str | None:
        """Store in every tier; the first tier's entry id, or None when the response is not worth storing."""
        if not content.strip() or len(content.encode()) > self._max_entry_bytes:
            return None
        ttl = min(ttl_s or self._ttl_for(key.namespace) or self._default_ttl_s, self._max_ttl_s)
        entry = NewEntry(content=content, usage=usage, ttl_s=ttl)
        now = self._clock()
        ids = [await _bounded(_budget(deadline), tier.store(key, entry, now)) for tier in self._tiers]
        self._count_later(key.namespace, {Counter.STORES: 1})
        return ids[0]

    def count_rejection(self, key: CacheKey, reason: str) -> None:
        """Called by the semantic tier for each candidate its verifier refuses (in the background)."""
        self._count_later(key.namespace, {Counter.SEMANTIC_REJECTIONS: 1})

    def _count_later(self, namespace: Namespace, counts: Mapping[str, int]) -> None:
        # Off the answer's path: a counter round trip to Redis must not add to every lookup's latency.
        # stats() and aclose() wait for these, so a reader in this process sees its own counts.
        task = asyncio.create_task(self._count(namespace, counts))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def invalidate(self, scope: InvalidationScope, deadline: Deadline | None = None) -> int:
        removed = 0
        for tier in self._tiers:
            removed += await _bounded(_budget(deadline), tier.invalidate(scope))
        return removed

    async def stats(self, tenant_id: str = "", deadline: Deadline | None = None, *,
                    per_namespace: bool = False) -> CacheStats:
        if self._background:
            await asyncio.wait(set(self._background), timeout=_budget(deadline))
        counts = await _bounded(_budget(deadline), self._stats.read_stats(tenant_id))
        namespaces: tuple[NamespaceStats, ...] = ()
        if per_namespace and tenant_id:
            rows = await _bounded(_budget(deadline), self._stats.read_namespace_stats(tenant_id))
            namespaces = tuple(NamespaceStats(ns, c) for ns, c in rows)
        unhealthy = [h for h in (t.health() for t in self._tiers) if h.degraded]
        return CacheStats.from_counts(counts, degraded=bool(unhealthy),
                                      degraded_detail="; ".join(h.detail for h in unhealthy), namespaces=namespaces)

    def health(self) -> list[TierHealth]:
        return [t.health() for t in self._tiers]

    async def flush_counters(self) -> None:
        """Wait for the counter updates already started (they run off the request path)."""
        await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush_counters()

    async def _count(self, namespace: Namespace, counts: Mapping[str, int]) -> None:
        # Counters are best effort: they must never turn a served answer into an error.
        try:
            await self._stats.incr_stats(namespace.tenant_id, {str(k): v for k, v in counts.items()}, namespace)
        except Exception as exc:
            log.warning("cache stats update failed: %s", type(exc).__name__)


def _budget(deadline: Deadline | None) -> float | None:
    # Evaluated before the backend call is even created: nothing starts that cannot finish.
    return None if deadline is None else deadline.hop_timeout(0.0)


async def _bounded(budget: float | None, call: Awaitable[T]) -> T:
    """Run one backend call inside what is left of the request's deadline."""
    if budget is None:
        return await call
    timeout = asyncio.timeout(budget)
    try:
        async with timeout:
            return await call
    except TimeoutError:
        if timeout.expired():
            raise DeadlineExceeded("deadline exceeded in the cache backend") from None
        raise
