"""The semantic tier with the real static model, the shipped verifier and Qdrant's engine in process.

Behind the exact tier on real Redis, as the service wires it: paraphrases hit, near-duplicates
that mean something else do not, namespaces/tenants/earlier turns are respected, and a
failing vector store leaves the exact tier serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from libs.chat import TokenUsage
from services.cache.cache import CacheTier, ResponseCache
from services.cache.domain import InvalidationScope, LookupOptions, NewEntry, TierKind, TokenPrice
from services.cache.embedding import StaticEmbedder
from services.cache.exact import ExactTier, RedisExactStore
from services.cache.semantic import SemanticPolicy, SemanticTier, context_id
from services.cache.vectors import Candidate, EdgeVectorStore, QdrantClientVectorStore, VectorStore
from services.cache.verifier import Verifier
from tests.unit.cache.cache_test_support import FakeClock, chat_key, static_model_dir

USAGE = TokenUsage(1000, 200, 0)


@pytest.fixture(scope="module")
def embedder() -> StaticEmbedder:
    return StaticEmbedder(static_model_dir())


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.load()


class Harness:
    def __init__(self, cache: ResponseCache, tier: SemanticTier, clock: FakeClock, policies: dict[str, SemanticPolicy]):
        self.cache, self.tier, self.clock, self.policies = cache, tier, clock, policies


async def _harness(redis_url: str, redis_prefix: str, embedder: StaticEmbedder, verifier: Verifier,
                   vectors: VectorStore) -> AsyncIterator[Harness]:
    client = Redis.from_url(redis_url)
    store = RedisExactStore(client, redis_prefix)
    clock = FakeClock()
    policies: dict[str, SemanticPolicy] = {}
    refs: list[ResponseCache] = []
    tier = SemanticTier(vectors, embedder, verifier, stale_window_s=600,
                        policy=lambda k: policies.get(k.namespace.tenant_id, SemanticPolicy()),
                        on_rejected=lambda k, r: refs[0].count_rejection(k, r))
    tiers: list[CacheTier] = [ExactTier(store, stale_window_s=600), tier]
    cache = ResponseCache(tiers, stats=store, default_ttl_s=60, max_ttl_s=600, max_entry_bytes=10_000, clock=clock)
    refs.append(cache)
    try:
        yield Harness(cache, tier, clock, policies)
    finally:
        await cache.aclose()
        await vectors.aclose()
        await client.aclose()


@pytest.fixture
async def h(redis_url: str, redis_prefix: str, embedder: StaticEmbedder, verifier: Verifier
            ) -> AsyncIterator[Harness]:
    async for x in _harness(redis_url, redis_prefix, embedder, verifier, EdgeVectorStore(None, embedder.dim)):
        yield x


async def test_a_paraphrase_is_served_from_the_semantic_tier(h: Harness) -> None:
    await h.cache.store(chat_key("How do I reset my password?"), "Use the reset link.", USAGE)
    hit = await h.cache.lookup(chat_key("How can I reset my password?"))
    assert hit is not None and hit.tier is TierKind.SEMANTIC and hit.content == "Use the reset link."
    assert hit.entry_id.startswith("semantic:") and 0.5 < hit.similarity <= 1.0 and hit.usage == USAGE
    exact = await h.cache.lookup(chat_key("How do I reset my password?"))
    assert exact is not None and exact.tier is TierKind.EXACT
    assert await h.cache.lookup(chat_key("How can I reset my password?"), LookupOptions(exact_only=True)) is None


@pytest.mark.parametrize(("stored", "asked"), [
    ("Transfer 50 dollars to my savings account", "Transfer 500 dollars to my savings account"),
    ("Is my card delivery going to be late?", "My card delivery is not going to be late?"),
    ("How do I close my account?", "How do I open an account?"),
    ("How do I reset my password?", "How do I reset my password? And how do I close my account?"),
])
async def test_near_duplicates_that_mean_something_else_are_refused(h: Harness, stored: str, asked: str) -> None:
    await h.cache.store(chat_key(stored), "answer", USAGE)
    assert await h.cache.lookup(chat_key(asked)) is None
    stats = await h.cache.stats("acme")
    assert stats.semantic_rejections >= 1 or stats.semantic_misses == 1


async def test_the_number_veto_and_the_model_score(verifier: Verifier, embedder: StaticEmbedder) -> None:
    a = embedder.analyze("I was charged twice for 3 payments")
    b = embedder.analyze("I was charged twice for 4 payments")
    v = verifier.verify(a, b)
    assert (v.accept, v.reason) == (False, "numbers")
    same = verifier.verify(a, embedder.analyze("I was charged twice for 3 payments"))
    assert same.accept and same.score > verifier.default_threshold


@pytest.mark.parametrize(("a", "b"), [
    ("Is the museum open on Sundays?", "Is the museum closed on Sundays?"),
    ("How do I disable notifications?", "How do I enable notifications?"),
    ("Can I cancel the order before it ships?", "Can I cancel the order after it ships?"),
])
async def test_antonyms_on_one_side_each_are_a_veto(verifier: Verifier, embedder: StaticEmbedder, a: str,
                                                    b: str) -> None:
    # The model alone scored the museum pair 0.916 (threshold 0.93; a PAWS-like namespace at 0.73 would serve it).
    v = verifier.verify(embedder.analyze(a), embedder.analyze(b), threshold=0.5)
    assert (v.accept, v.reason) == (False, "antonyms")
    # The same words on both sides are no veto: word order and the rest are the model's business.
    both = verifier.verify(embedder.analyze("Is the shop open or closed on Sunday?"),
                           embedder.analyze("Is the shop closed or open on Sunday?"), threshold=0.5)
    assert both.reason != "antonyms"


async def test_identifiers_with_digits_must_match(verifier: Verifier, embedder: StaticEmbedder) -> None:
    # Found by the gateway benchmark: "guard X m1" and "guard X m2" were served the same answer.
    a = embedder.analyze("What is the status of order a17 in warehouse m1?")
    b = embedder.analyze("What is the status of order a17 in warehouse m2?")
    assert (verifier.verify(a, b).accept, verifier.verify(a, b).reason) == (False, "identifiers")
    assert verifier.verify(a, embedder.analyze("What is the status of order a17 in warehouse m1?")).accept
    c = embedder.analyze("Compare ipv4 and ipv6 routing")
    assert verifier.verify(c, embedder.analyze("Compare ipv4 and ipv5 routing")).reason == "identifiers"


async def test_tenants_and_namespaces_never_cross(h: Harness) -> None:
    await h.cache.store(chat_key("How do I reset my password?", tenant="tenant-b"), "B's answer", USAGE)
    assert await h.cache.lookup(chat_key("How can I reset my password?", tenant="tenant-a")) is None
    assert await h.cache.lookup(chat_key("How can I reset my password?", tenant="tenant-b",
                                         prompt_version="v2")) is None
    assert await h.cache.lookup(chat_key("How can I reset my password?", tenant="tenant-b",
                                         model_class="strong")) is None
    hit = await h.cache.lookup(chat_key("How can I reset my password?", tenant="tenant-b"))
    assert hit is not None and hit.content == "B's answer"


async def test_a_follow_up_matches_only_after_the_same_earlier_turns(h: Harness) -> None:
    await h.cache.store(chat_key("Tell me about Paris.", "Paris is the capital of France.",
                                 "How many people live there?"), "About 2.1 million.", USAGE)
    same_history = chat_key("Tell me about Paris.", "Paris is the capital of France.", "How many people live there?")
    reworded = chat_key("Tell me about Paris.", "Paris is the capital of France.", "So how many people live there?")
    other_history = chat_key("Tell me about Lyon.", "Lyon is a city in France.", "How many people live there?")
    assert (await h.cache.lookup(same_history)) is not None
    hit = await h.cache.lookup(reworded)
    assert hit is not None and hit.tier is TierKind.SEMANTIC
    assert await h.cache.lookup(other_history) is None
    assert context_id(reworded, "fp") == context_id(same_history, "fp") != context_id(other_history, "fp")


async def test_invalidation_by_prompt_version_and_namespace_reaches_the_semantic_tier(h: Harness) -> None:
    await h.cache.store(chat_key("How do I reset my password?", prompt_version="v1"), "one", USAGE)
    await h.cache.store(chat_key("How do I reset my password?", prompt_version="v2"), "two", USAGE)
    # One exact and one semantic entry each.
    assert await h.cache.invalidate(InvalidationScope("acme", prompt_version="v1")) == 2
    assert await h.cache.lookup(chat_key("How can I reset my password?", prompt_version="v1")) is None
    hit = await h.cache.lookup(chat_key("How can I reset my password?", prompt_version="v2"))
    assert hit is not None and hit.content == "two"
    assert await h.cache.invalidate(InvalidationScope("acme")) == 2
    assert await h.cache.lookup(chat_key("How can I reset my password?", prompt_version="v2")) is None


async def test_ttl_max_age_and_stale_reads(h: Harness) -> None:
    await h.cache.store(chat_key("How do I reset my password?"), "answer", USAGE, ttl_s=30)
    asked = chat_key("How can I reset my password?")
    assert await h.cache.lookup(asked, LookupOptions(max_age_s=10)) is not None
    h.clock.advance(20)
    assert await h.cache.lookup(asked, LookupOptions(max_age_s=10)) is None
    h.clock.advance(20)  # past the TTL, inside the stale window
    assert await h.cache.lookup(asked) is None
    stale = await h.cache.lookup(asked, LookupOptions(allow_stale=True))
    assert stale is not None and stale.stale and stale.tier is TierKind.SEMANTIC
    h.clock.advance(10_000)  # past the stale window too: swept away
    assert await h.tier.sweep(h.clock()) == 1
    assert await h.cache.lookup(asked, LookupOptions(allow_stale=True)) is None


async def test_operating_point_per_namespace_and_per_request(h: Harness) -> None:
    await h.cache.store(chat_key("How do I reset my password?"), "answer", USAGE)
    asked = chat_key("How can I reset my password?")
    hit = await h.cache.lookup(asked)
    assert hit is not None
    assert await h.cache.lookup(asked, LookupOptions(semantic_threshold=min(0.9999, hit.similarity + 1e-3))) is None
    h.policies["acme"] = SemanticPolicy(threshold=0.9999)
    assert await h.cache.lookup(asked) is None
    h.policies["acme"] = SemanticPolicy(enabled=False)
    assert await h.cache.lookup(asked, LookupOptions(semantic_threshold=0.01)) is None


async def test_stats_per_tier_namespace_and_dollars_saved(h: Harness) -> None:
    price = TokenPrice(input_per_mtok=3_000_000_000, output_per_mtok=15_000_000_000)
    await h.cache.store(chat_key("How do I reset my password?"), "answer", USAGE)
    await h.cache.lookup(chat_key("How can I reset my password?"), LookupOptions(price=price))
    await h.cache.lookup(chat_key("How do I reset my password?"), LookupOptions(price=price))
    await h.cache.lookup(chat_key("What is the weather on Mars?"), LookupOptions(price=price))
    await h.cache.lookup(chat_key("Where is my nearest branch?", prompt_version="v9"))
    s = await h.cache.stats("acme", per_namespace=True)
    assert (s.exact_hits, s.semantic_hits, s.misses, s.stores) == (1, 1, 2, 1)
    assert (s.exact_misses, s.semantic_misses) == (3, 2)
    # 1000 input tokens at $3/M + 200 output at $15/M = $0.006, twice.
    assert s.saved_nano_usd == 2 * 6_000_000
    by_version = {n.namespace.prompt_version: n.counts for n in s.namespaces}
    assert by_version["v9"] == {"exact_misses": 1, "semantic_misses": 1, "misses": 1}
    assert by_version["v1"]["saved_nano_usd"] == 12_000_000


class BrokenVectors:
    """A vector store that is down."""

    def __init__(self) -> None:
        self.calls = 0

    async def search(self, vector: np.ndarray, tenant_id: str, context: str, now: float,
                     limit: int, min_score: float) -> list[Candidate]:
        self.calls += 1
        raise ConnectionError("vector store down")

    async def upsert(self, point_id: str, vector: np.ndarray, payload: Mapping[str, Any]) -> None:
        self.calls += 1
        raise ConnectionError("vector store down")

    async def delete(self, scope: InvalidationScope) -> int:
        raise ConnectionError("vector store down")

    async def sweep(self, now: float) -> int:
        raise ConnectionError("vector store down")

    async def count(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None


async def test_vector_store_down_leaves_the_exact_tier_serving(redis_url: str, redis_prefix: str,
                                                              embedder: StaticEmbedder, verifier: Verifier) -> None:
    broken = BrokenVectors()
    async for h in _harness(redis_url, redis_prefix, embedder, verifier, broken):
        key = chat_key("How do I reset my password?")
        assert await h.cache.store(key, "answer", USAGE)
        hit = await h.cache.lookup(key)
        assert hit is not None and hit.tier is TierKind.EXACT
        assert await h.cache.lookup(chat_key("How can I reset my password?")) is None
        stats = await h.cache.stats("acme")
        assert stats.degraded and "vector store unreachable" in stats.degraded_detail
        # Until the recheck time, requests do not even try the broken store.
        assert broken.calls == 1


async def test_qdrant_client_path_local_mode(redis_url: str, redis_prefix: str, embedder: StaticEmbedder,
                                             verifier: Verifier) -> None:
    """The server path (TOLLGATE_QDRANT_URL) goes through qdrant-client; its local mode speaks the same API."""
    from qdrant_client import AsyncQdrantClient

    vectors = QdrantClientVectorStore(AsyncQdrantClient(location=":memory:"), "cache_test", embedder.dim)
    async for h in _harness(redis_url, redis_prefix, embedder, verifier, vectors):
        await h.cache.store(chat_key("How do I reset my password?"), "answer", USAGE)
        hit = await h.cache.lookup(chat_key("How can I reset my password?"))
        assert hit is not None and hit.tier is TierKind.SEMANTIC
        assert await h.cache.lookup(chat_key("How can I reset my password?", tenant="other")) is None
        assert await h.cache.invalidate(InvalidationScope("acme", model_class="fast")) == 2
        assert await vectors.count() == 0


def test_edge_store_persists_under_its_path(tmp_path: Path, embedder: StaticEmbedder) -> None:
    import asyncio

    async def roundtrip() -> tuple[int, int]:
        first = EdgeVectorStore(tmp_path / "vectors", embedder.dim)
        await first.upsert("00000000-0000-0000-0000-000000000001", embedder.analyze("hello").vector,
                           {"tenant": "t", "ctx": "c", "retain_until": 1e12})
        await first.aclose()
        again = EdgeVectorStore(tmp_path / "vectors", embedder.dim)
        n = await again.count()
        found = await again.search(embedder.analyze("hello").vector, "t", "c", 0.0, 4, 0.5)
        await again.aclose()
        return n, len(found)

    assert asyncio.run(roundtrip()) == (1, 1)


async def test_the_sweep_removes_an_entry_only_past_its_ttl_and_the_stale_window(embedder: StaticEmbedder,
                                                                                 verifier: Verifier) -> None:
    vectors = EdgeVectorStore(None, embedder.dim)
    tier = SemanticTier(vectors, embedder, verifier, stale_window_s=600)
    try:
        now = 1_700_000_000.0
        assert await tier.store(chat_key("How do I reset my password?"), NewEntry("answer", USAGE, ttl_s=30), now)
        assert await tier.sweep(now + 30) == 0  # expired, but still served stale
        assert await tier.sweep(now + 629.9) == 0
        assert await tier.sweep(now + 630) == 1
        assert await vectors.count() == 0
    finally:
        await vectors.aclose()


async def test_cached_analyses_stay_within_their_byte_bound(embedder: StaticEmbedder, verifier: Verifier) -> None:
    """The candidates' analyses are cached (a vector per word); long prompts must not make that unbounded."""
    vectors = EdgeVectorStore(None, embedder.dim)
    bound = 256 * 1024  # about three analyses of these prompts
    tier = SemanticTier(vectors, embedder, verifier, stale_window_s=0, analysis_cache_bytes=bound)
    try:
        now = 1_700_000_000.0
        filler = " ".join(["please tell me about the fees of my savings account and card"] * 6)
        for i in range(40):
            await tier.store(chat_key(f"{filler} case {i}"), NewEntry("answer", USAGE, ttl_s=60), now)
            await tier.lookup(chat_key(f"{filler} case {i + 1000}"), LookupOptions(), now)
            assert 0 < tier.analysis_cache_bytes <= bound
    finally:
        await vectors.aclose()
