"""The exact tier on real Redis: hits, freshness, stale reads, invalidation, stats, isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.chat import ChatMessage, Role, TokenUsage
from services.cache.cache import ResponseCache
from services.cache.domain import CacheStats, InvalidationScope, LookupOptions, Namespace, TierKind
from services.cache.exact import ExactRecord, ExactTier, RedisExactStore
from services.cache.keys import exact_key
from tests.unit.cache.cache_test_support import FakeClock, make_key

TTL = 60
STALE_WINDOW = 600
USAGE = TokenUsage(input_tokens=12, output_tokens=3, cached_input_tokens=4)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    c = Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(client: Redis, redis_prefix: str) -> RedisExactStore:
    return RedisExactStore(client, redis_prefix)


@pytest.fixture
def cache(store: RedisExactStore, clock: FakeClock) -> ResponseCache:
    return ResponseCache([ExactTier(store, stale_window_s=STALE_WINDOW)], stats=store, default_ttl_s=TTL,
                         max_ttl_s=3600, max_entry_bytes=1024, clock=clock)


async def test_store_then_lookup_hits_with_everything_stored(cache: ResponseCache, clock: FakeClock) -> None:
    key = make_key()
    entry_id = await cache.store(key, "Paris.", USAGE)
    hit = await cache.lookup(key)
    assert hit is not None and entry_id
    assert (hit.tier, hit.entry_id, hit.content, hit.usage, hit.model) == (TierKind.EXACT, entry_id, "Paris.",
                                                                          USAGE, "gpt-x")
    assert hit.stored_at == pytest.approx(clock.now) and hit.expires_at == pytest.approx(clock.now + TTL)
    assert not hit.stale and hit.similarity == 1.0


async def test_normalization_hits_and_differences_miss(cache: ResponseCache) -> None:
    await cache.store(make_key("What is   the capital\nof France?"), "Paris.", USAGE)
    assert await cache.lookup(make_key("  What is the capital of France? ")) is not None
    for other in (make_key("What is the capital of Spain?"), make_key(model="gpt-y"),
                  make_key(prompt_version="v2"), make_key(model_class="smart"), make_key(temperature=0.5),
                  make_key(tenant="globex")):
        assert await cache.lookup(other) is None


async def test_multi_turn_matches_only_with_the_same_earlier_turns(cache: ResponseCache) -> None:
    base = make_key()
    convo = replace(base, messages=(*base.messages, ChatMessage(Role.ASSISTANT, "Paris."),
                                    ChatMessage(Role.USER, "And its population?")))
    await cache.store(convo, "About 2.1 million.", USAGE)
    assert await cache.lookup(convo) is not None
    changed = replace(convo, messages=(*base.messages, ChatMessage(Role.ASSISTANT, "Paris, France."),
                                       ChatMessage(Role.USER, "And its population?")))
    last_turn_only = replace(base, messages=(ChatMessage(Role.USER, "And its population?"),))
    assert await cache.lookup(changed) is None
    assert await cache.lookup(last_turn_only) is None


async def test_ttl_freshness_and_stale_reads(cache: ResponseCache, clock: FakeClock) -> None:
    key = make_key()
    await cache.store(key, "Paris.", USAGE, ttl_s=10)
    clock.advance(9)
    assert (await cache.lookup(key)) is not None
    clock.advance(2)  # past the TTL, inside the stale window
    assert await cache.lookup(key) is None
    stale = await cache.lookup(key, LookupOptions(allow_stale=True))
    assert stale is not None and stale.stale and stale.content == "Paris."


async def test_redis_retains_for_ttl_plus_stale_window(cache: ResponseCache, store: RedisExactStore,
                                                       client: Redis) -> None:
    key = make_key()
    await cache.store(key, "Paris.", USAGE, ttl_s=10)
    pttl = await client.pttl(store.entry_key("acme", exact_key(key)))
    assert (10 + STALE_WINDOW) * 1000 - 2000 < pttl <= (10 + STALE_WINDOW) * 1000


async def test_past_the_stale_window_nothing_is_served(store: RedisExactStore, clock: FakeClock) -> None:
    # Redis drops the key itself at the end of the window; the local check mirrors it.
    tier = ExactTier(store, stale_window_s=0)
    cache = ResponseCache([tier], stats=store, default_ttl_s=TTL, max_ttl_s=3600, max_entry_bytes=1024, clock=clock)
    key = make_key()
    await cache.store(key, "Paris.", USAGE, ttl_s=1)
    clock.advance(2)
    assert await cache.lookup(key, LookupOptions(allow_stale=True)) is not None  # Redis still has it (real time)
    await store._r.delete(store.entry_key("acme", exact_key(key)))  # what Redis does at the end of the window
    assert await cache.lookup(key, LookupOptions(allow_stale=True)) is None


async def test_max_age(cache: ResponseCache, clock: FakeClock) -> None:
    key = make_key()
    await cache.store(key, "Paris.", USAGE)
    clock.advance(30)
    assert await cache.lookup(key, LookupOptions(max_age_s=10)) is None
    assert await cache.lookup(key, LookupOptions(max_age_s=30)) is not None
    assert await cache.lookup(key, LookupOptions(max_age_s=0)) is not None
    too_old = await cache.lookup(key, LookupOptions(max_age_s=10, allow_stale=True))
    assert too_old is not None and too_old.stale


async def test_only_worthwhile_responses_are_stored(cache: ResponseCache) -> None:
    key = make_key()
    assert await cache.store(key, "   \n", USAGE) is None
    assert await cache.store(key, "x" * 1025, USAGE) is None
    assert await cache.store(key, "é" * 513, USAGE) is None  # 1026 bytes in UTF-8
    assert await cache.lookup(key) is None
    assert (await cache.stats("acme")).stores == 0


async def test_ttl_defaults_and_is_capped(cache: ResponseCache, clock: FakeClock) -> None:
    await cache.store(make_key("a"), "A.", USAGE)
    await cache.store(make_key("b"), "B.", USAGE, ttl_s=10_000)
    a, b = await cache.lookup(make_key("a")), await cache.lookup(make_key("b"))
    assert a is not None and a.expires_at == pytest.approx(clock.now + TTL)
    assert b is not None and b.expires_at == pytest.approx(clock.now + 3600)


async def test_tenants_are_isolated_even_with_awkward_ids(cache: ResponseCache, store: RedisExactStore) -> None:
    awkward = "a:b{c}*?[x] é"
    await cache.store(make_key(tenant=awkward), "secret of awkward", USAGE)
    await cache.store(make_key(tenant="a"), "secret of a", USAGE)
    hit_awkward = await cache.lookup(make_key(tenant=awkward))
    hit_a = await cache.lookup(make_key(tenant="a"))
    assert hit_awkward is not None and hit_awkward.content == "secret of awkward"
    assert hit_a is not None and hit_a.content == "secret of a"
    # Even the same key hash under another tenant's layout finds nothing.
    assert await store.get("a", exact_key(make_key(tenant=awkward))) is None
    assert "{a%3Ab%7Bc%7D%2A%3F%5Bx%5D%20%C3%A9}" in store.entry_key(awkward, "h")
    assert await cache.invalidate(InvalidationScope("a")) == 1
    assert await cache.lookup(make_key(tenant=awkward)) is not None


async def test_invalidate_by_tenant_model_class_and_prompt_version(cache: ResponseCache) -> None:
    keys = {
        ("acme", "fast", "v1"): make_key("q1"),
        ("acme", "fast", "v2"): make_key("q2", prompt_version="v2"),
        ("acme", "smart", "v1"): make_key("q3", model_class="smart"),
        ("acme", "smart", "v2"): make_key("q4", model_class="smart", prompt_version="v2"),
        ("globex", "fast", "v1"): make_key("q1", tenant="globex"),
    }
    for k in keys.values():
        await cache.store(k, "answer", USAGE)
    await cache.store(make_key("q5"), "answer", USAGE)  # a second entry in acme/fast/v1

    async def alive() -> set[tuple[str, str, str]]:
        return {name for name, k in keys.items() if await cache.lookup(k) is not None}

    assert await cache.invalidate(InvalidationScope("acme", prompt_version="v1")) == 3
    assert await alive() == {("acme", "fast", "v2"), ("acme", "smart", "v2"), ("globex", "fast", "v1")}
    assert await cache.invalidate(InvalidationScope("acme", prompt_version="v1")) == 0

    assert await cache.invalidate(InvalidationScope("acme", model_class="smart", prompt_version="v2")) == 1
    assert await alive() == {("acme", "fast", "v2"), ("globex", "fast", "v1")}

    await cache.store(keys["acme", "smart", "v1"], "answer", USAGE)  # a fresh index after invalidation
    assert await cache.invalidate(InvalidationScope("acme", model_class="smart")) == 1
    assert await cache.invalidate(InvalidationScope("acme")) == 1
    assert await alive() == {("globex", "fast", "v1")}
    assert await cache.invalidate(InvalidationScope("nobody")) == 0


async def test_an_interrupted_invalidation_is_finished_by_the_next(cache: ResponseCache, store: RedisExactStore,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        await cache.store(make_key(f"q{i}"), "answer", USAGE)
        await cache.store(make_key(f"q{i}", prompt_version="v2"), "answer", USAGE)
    real_unlink = store._r.unlink

    async def broken_unlink(*names: str) -> int:
        raise RedisConnectionError("connection lost mid-invalidation")

    monkeypatch.setattr(store._r, "unlink", broken_unlink)
    with pytest.raises(RedisConnectionError):
        await cache.invalidate(InvalidationScope("acme", prompt_version="v1"))
    monkeypatch.setattr(store._r, "unlink", real_unlink)
    # A narrower, unrelated call completes the claimed v1 set as well as its own scope.
    assert await cache.invalidate(InvalidationScope("acme", prompt_version="v2")) == 6
    assert [await cache.lookup(make_key(f"q{i}")) for i in range(3)] == [None, None, None]


async def test_namespace_index_is_trimmed_of_dead_entries(store: RedisExactStore, client: Redis,
                                                          clock: FakeClock, redis_prefix: str) -> None:
    ns = Namespace("acme", "fast", "sp", "v1")
    for i in range(5):
        await store.put(ns, f"h{i}", ExactRecord("a", USAGE, "m", clock.now, clock.now + 1), retain_s=2)
    [index] = [k async for k in client.scan_iter(match=f"{redis_prefix}cache:{{acme}}:ns:*")]
    assert await client.zcard(index) == 5
    assert 0 < await client.pttl(index) <= 2000
    clock.advance(3)  # every earlier entry is past its retention now
    await store.put(ns, "h-new", ExactRecord("a", USAGE, "m", clock.now, clock.now + 100), retain_s=200)
    assert await client.zrange(index, 0, -1) == [b"h-new"]
    assert await client.pttl(index) > 2000


async def test_stats_per_tenant_and_overall(cache: ResponseCache) -> None:
    await cache.store(make_key(), "Paris.", USAGE)
    await cache.lookup(make_key())
    await cache.lookup(make_key())
    await cache.lookup(make_key("unknown"))
    await cache.store(make_key(tenant="globex"), "Paris.", USAGE)
    await cache.lookup(make_key("unknown", tenant="globex"))
    assert await cache.stats("acme") == CacheStats(exact_hits=2, misses=1, stores=1, exact_misses=1)
    assert await cache.stats("globex") == CacheStats(exact_hits=0, misses=1, stores=1, exact_misses=1)
    assert await cache.stats("") == CacheStats(exact_hits=2, misses=2, stores=2, exact_misses=2)
    assert await cache.stats("nobody") == CacheStats()


async def test_unreadable_record_is_a_miss(cache: ResponseCache, store: RedisExactStore, client: Redis) -> None:
    key = make_key()
    await client.set(store.entry_key("acme", exact_key(key)), b"not a record")
    assert await cache.lookup(key) is None
    await cache.store(key, "Paris.", USAGE)
    assert await cache.lookup(key) is not None


def test_record_round_trip_is_compact() -> None:
    record = ExactRecord("Ünïcode ✓", USAGE, "gpt-x", 1_700_000_000.123, 1_700_003_600.123)
    raw = record.encode()
    assert ExactRecord.decode(raw) == record
    assert len(raw) < 80
    with pytest.raises(ValueError):
        ExactRecord.decode(b'[99,"x",0,0,0,"m",1,2]')
