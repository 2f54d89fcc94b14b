"""Redis outages: the in-process LRU serves, GetStats says degraded, and Redis comes back into use."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from libs.chat import TokenUsage
from libs.errors import Unavailable
from services.cache.cache import ResponseCache
from services.cache.domain import InvalidationScope, Namespace
from services.cache.exact import ExactRecord, ExactTier, RedisExactStore
from services.cache.fallback import FallbackStore, LocalLruStore
from services.cache.keys import exact_key
from services.cache.server import redis_client
from services.cache.settings import CacheSettings
from tests.unit.cache.cache_test_support import FakeClock, TcpProxy, make_key

USAGE = TokenUsage(10, 2, 0)
NS = Namespace("acme", "fast", "sp", "v1")


def record(clock: FakeClock, content: str = "a") -> ExactRecord:
    return ExactRecord(content, USAGE, "m", clock.now, clock.now + 60)


# --- the LRU on its own ---

async def test_lru_evicts_least_recently_used() -> None:
    clock = FakeClock()
    lru = LocalLruStore(2, clock=clock)
    await lru.put(NS, "h1", record(clock), 100)
    await lru.put(NS, "h2", record(clock), 100)
    assert await lru.get("acme", "h1") is not None  # h1 is now the most recent
    await lru.put(NS, "h3", record(clock), 100)
    assert await lru.get("acme", "h2") is None
    assert await lru.get("acme", "h1") is not None and await lru.get("acme", "h3") is not None
    assert await lru.get("globex", "h1") is None


async def test_lru_retention_invalidation_and_stats() -> None:
    clock = FakeClock()
    lru = LocalLruStore(100, clock=clock)
    await lru.put(NS, "h1", record(clock), 10)
    await lru.put(Namespace("acme", "fast", "sp", "v2"), "h2", record(clock), 100)
    await lru.put(Namespace("globex", "fast", "sp", "v1"), "h3", record(clock), 100)
    clock.advance(11)
    assert await lru.get("acme", "h1") is None  # past retention
    assert await lru.invalidate(InvalidationScope("acme", prompt_version="v1")) == 0
    assert await lru.invalidate(InvalidationScope("acme", model_class="fast")) == 1
    assert await lru.get("globex", "h3") is not None
    await lru.incr_stats("acme", {"misses": 2})
    await lru.incr_stats("globex", {"misses": 1, "stores": 1})
    assert await lru.read_stats("") == {"misses": 3, "stores": 1}
    assert lru.drain_stats() == {"acme": {"misses": 2}, "globex": {"misses": 1, "stores": 1}}
    assert await lru.read_stats("acme") == {}


# --- failover ---

def settings(url: str, prefix: str, recheck_s: float = 60.0) -> CacheSettings:
    return CacheSettings(redis_url=url, redis_prefix=prefix, redis_recheck_s=recheck_s, redis_timeout_s=0.5)


def build(s: CacheSettings, clock: FakeClock) -> tuple[ResponseCache, FallbackStore, Redis]:
    client = redis_client(s)
    store = FallbackStore(RedisExactStore(client, s.redis_prefix), LocalLruStore(100, clock=clock),
                          recheck_s=s.redis_recheck_s)
    cache = ResponseCache([ExactTier(store, stale_window_s=600)], stats=store, default_ttl_s=60, max_ttl_s=3600,
                          max_entry_bytes=10_000, clock=clock)
    return cache, store, client


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy(redis_url).start()
    yield p
    await p.stop()


async def test_redis_unreachable_at_start_serves_from_lru(redis_prefix: str) -> None:
    cache, store, client = build(settings("redis://127.0.0.1:1/0", redis_prefix), FakeClock())
    try:
        await store.start()
        assert store.degraded
        assert await cache.lookup(make_key()) is None
        assert await cache.store(make_key(), "Paris.", USAGE)
        hit = await cache.lookup(make_key())
        assert hit is not None and hit.content == "Paris."
        assert await cache.invalidate(InvalidationScope("acme")) == 1
        stats = await cache.stats("acme")
        assert stats.degraded and "redis unreachable" in stats.degraded_detail
        assert "in-process LRU" in stats.degraded_detail
        assert (stats.misses, stats.exact_hits, stats.stores) == (1, 1, 1)
        assert await store.check_now() is False  # still down: reported, not raised
    finally:
        await store.aclose()
        await client.aclose()


async def test_outage_and_recovery(proxy: TcpProxy, redis_prefix: str, redis_url: str) -> None:
    clock = FakeClock()
    cache, store, client = build(settings(proxy.url, redis_prefix), clock)
    direct = RedisExactStore(Redis.from_url(redis_url), redis_prefix)
    try:
        await store.start()
        assert not store.degraded
        before = make_key("stored before the outage")
        kept = make_key("kept across the outage", prompt_version="v2")
        await cache.store(before, "old answer", USAGE)
        await cache.store(kept, "kept answer", USAGE)
        await cache.lookup(before)
        await cache.flush_counters()  # counters are written off the request path

        await proxy.stop()
        # The first failing call fails over inside the same request: a miss, not an error.
        assert await cache.lookup(before) is None
        assert store.degraded
        during = make_key("stored during the outage")
        await cache.store(during, "lru answer", USAGE)
        assert (await cache.lookup(during)) is not None
        # Invalidated while Redis cannot hear it: must be replayed before Redis is used again.
        assert await cache.invalidate(InvalidationScope("acme", prompt_version="v1")) == 1
        stats = await cache.stats("acme")
        assert stats.degraded and (stats.misses, stats.stores, stats.exact_hits) == (1, 1, 1)

        await proxy.start()
        assert await store.check_now() is True
        assert not store.degraded
        assert await direct.get("acme", exact_key(before)) is None  # the replayed invalidation
        assert await cache.lookup(before) is None
        assert await cache.lookup(during) is None  # the LRU is only an outage buffer
        hit = await cache.lookup(kept)
        assert hit is not None and hit.content == "kept answer"
        stats = await cache.stats("acme")
        # Redis counts (2 stores, 1 hit before) plus the outage's, flushed, plus the three lookups just now.
        assert not stats.degraded and stats.degraded_detail == ""
        assert (stats.stores, stats.exact_hits, stats.misses) == (3, 3, 3)
    finally:
        await store.aclose()
        await client.aclose()
        await direct._r.aclose()


async def test_recovery_is_probed_in_the_background(proxy: TcpProxy, redis_prefix: str) -> None:
    cache, store, client = build(settings(proxy.url, redis_prefix, recheck_s=0.05), FakeClock())
    try:
        await store.start()
        await proxy.stop()
        await cache.lookup(make_key())
        assert store.degraded
        await proxy.start()
        deadline = time.monotonic() + 5
        while store.degraded and time.monotonic() < deadline:
            # Requests are answered from the LRU right away; at most one probe per interval runs behind them.
            started = time.monotonic()
            await cache.lookup(make_key())
            assert time.monotonic() - started < 0.05
            await asyncio.sleep(0.02)
        assert not store.degraded
        await cache.store(make_key(), "Paris.", USAGE)
        assert await RedisExactStore(client, redis_prefix).get("acme", exact_key(make_key())) is not None
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_redis_command_error_is_unavailable_not_a_failover(redis_url: str, redis_prefix: str) -> None:
    cache, store, client = build(settings(redis_url, redis_prefix), FakeClock())
    try:
        await store.start()
        key = make_key()
        entry = RedisExactStore(client, redis_prefix).entry_key("acme", exact_key(key))
        await client.rpush(entry, "not a string")  # GET on a list: WRONGTYPE
        with pytest.raises(Unavailable) as err:
            await cache.lookup(key)
        assert err.value.reason == "BACKEND_ERROR"
        assert not store.degraded
    finally:
        await store.aclose()
        await client.aclose()


async def test_lru_is_bounded_by_bytes_too() -> None:
    clock = FakeClock()
    lru = LocalLruStore(1000, max_bytes=3 * (1000 + 2 + 256), clock=clock)
    for i in range(5):
        await lru.put(NS, f"h{i}", record(clock, "x" * 1000), 100)
    assert len(lru) == 3
    assert [await lru.get("acme", f"h{i}") is not None for i in range(5)] == [False, False, True, True, True]
    await lru.put(NS, "h4", record(clock, "y"), 100)  # replacing an entry frees its bytes
    await lru.put(NS, "h5", record(clock, "z"), 100)
    assert len(lru) == 4
