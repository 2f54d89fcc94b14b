"""ResponseCache over several tiers: order, exact_only, hit accounting, deadlines.

The second tier here is a stand-in for the semantic tier to come, written against
the CacheTier protocol; the exact tier is the real one on Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from libs.chat import TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded
from services.cache.cache import CacheTier, ResponseCache
from services.cache.domain import (
    CacheHit,
    CacheKey,
    InvalidationScope,
    LookupOptions,
    NewEntry,
    TierHealth,
    TierKind,
)
from services.cache.exact import ExactTier, RedisExactStore
from tests.unit.cache.cache_test_support import FakeClock, make_key

USAGE = TokenUsage(5, 5, 0)


class SecondTier:
    """Answers every lookup (like a semantic near-match), optionally slowly."""

    kind = TierKind.SEMANTIC

    def __init__(self, delay_s: float = 0.0, degraded: bool = False):
        self.delay_s = delay_s
        self.degraded = degraded
        self.stored: list[NewEntry] = []

    async def lookup(self, key: CacheKey, options: LookupOptions, now: float) -> CacheHit | None:
        await asyncio.sleep(self.delay_s)
        return CacheHit(TierKind.SEMANTIC, "sem:1", "near answer", USAGE, key.model, now, now + 60, similarity=0.93)

    async def store(self, key: CacheKey, entry: NewEntry, now: float) -> str:
        self.stored.append(entry)
        return "sem:1"

    async def invalidate(self, scope: InvalidationScope) -> int:
        return 2

    def health(self) -> TierHealth:
        return TierHealth(self.degraded, "vector store down" if self.degraded else "")


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisExactStore]:
    client = Redis.from_url(redis_url)
    yield RedisExactStore(client, redis_prefix)
    await client.aclose()


def make_cache(store: RedisExactStore, second: SecondTier) -> ResponseCache:
    tiers: list[CacheTier] = [ExactTier(store, stale_window_s=60), second]
    return ResponseCache(tiers, stats=store, default_ttl_s=60, max_ttl_s=600, max_entry_bytes=1000,
                         clock=FakeClock())


async def test_tiers_in_order_and_hits_counted_per_tier(store: RedisExactStore) -> None:
    second = SecondTier()
    cache = make_cache(store, second)
    near = await cache.lookup(make_key())
    assert near is not None and near.tier is TierKind.SEMANTIC and near.similarity == pytest.approx(0.93)
    assert await cache.lookup(make_key(), LookupOptions(exact_only=True)) is None

    entry_id = await cache.store(make_key(), "exact answer", USAGE, ttl_s=30)
    assert second.stored[0].ttl_s == 30
    exact = await cache.lookup(make_key())
    assert exact is not None and exact.tier is TierKind.EXACT and exact.entry_id == entry_id

    stats = await cache.stats("acme")
    assert (stats.semantic_hits, stats.exact_hits, stats.misses, stats.stores) == (1, 1, 1, 1)
    assert await cache.invalidate(InvalidationScope("acme")) == 1 + 2


async def test_degraded_tiers_are_reported(store: RedisExactStore) -> None:
    stats = await make_cache(store, SecondTier(degraded=True)).stats()
    assert stats.degraded and stats.degraded_detail == "vector store down"


async def test_the_request_deadline_bounds_each_tier(store: RedisExactStore) -> None:
    cache = make_cache(store, SecondTier(delay_s=5))
    with pytest.raises(DeadlineExceeded):
        await cache.lookup(make_key(), deadline=Deadline.after(0.05))
    with pytest.raises(DeadlineExceeded):
        await cache.lookup(make_key(), deadline=Deadline.after(0))  # nothing left: no backend call starts
    assert await cache.lookup(make_key(), LookupOptions(exact_only=True), deadline=Deadline.after(1)) is None
