"""The semantic tier's embedded vector store (services.cache.vectors.EdgeVectorStore over libs.vector_store),
with hand-made vectors: tenant and context isolation, retention, invalidation scopes, sweeps, persistence, and
the capacity bound (on qdrant-client's local mode too)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest

from services.cache.domain import InvalidationScope
from services.cache.vectors import (
    CONTEXT,
    MODEL_CLASS,
    PROMPT_VERSION,
    RETAIN_UNTIL,
    TENANT,
    EdgeVectorStore,
    QdrantClientVectorStore,
    VectorStore,
    eviction_size,
)

DIM = 16


def vec(i: int, *, lean: int | None = None) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    if lean is not None:
        v[lean] = 0.5
    out: np.ndarray = (v / np.linalg.norm(v)).astype(np.float32)
    return out


def pid(i: int) -> str:
    return str(uuid.UUID(int=i))


def payload(tenant: str, ctx: str = "c", *, model_class: str = "fast", version: str = "v1",
            until: float = 100.0) -> dict[str, object]:
    return {TENANT: tenant, CONTEXT: ctx, MODEL_CLASS: model_class, PROMPT_VERSION: version, RETAIN_UNTIL: until,
            "entry": "k"}


async def test_search_sees_only_the_tenant_and_context_and_live_entries() -> None:
    store = EdgeVectorStore(None, DIM)
    try:
        await store.upsert(pid(1), vec(0), payload("a"))
        await store.upsert(pid(2), vec(0, lean=1), payload("a"))
        await store.upsert(pid(3), vec(0), payload("b"))
        await store.upsert(pid(4), vec(0), payload("a", "other"))
        await store.upsert(pid(5), vec(0), payload("a", until=10.0))
        found = await store.search(vec(0), "a", "c", now=50.0, limit=10, min_score=0.5)
        assert [c.point_id for c in found] == [pid(1), pid(2)]
        assert found[0].score == pytest.approx(1.0, abs=1e-5) and found[0].score > found[1].score
        assert found[0].payload[TENANT] == "a" and found[0].payload["entry"] == "k"
        # Retained until 10: found before then, not at or after it.
        assert pid(5) in [c.point_id for c in await store.search(vec(0), "a", "c", 9.0, 10, 0.5)]
        assert pid(5) not in [c.point_id for c in await store.search(vec(0), "a", "c", 10.0, 10, 0.5)]
        # min_score cuts off the tilted vector (cosine ~0.894).
        assert [c.point_id for c in await store.search(vec(0), "a", "c", 50.0, 10, 0.95)] == [pid(1)]
        assert await store.search(vec(0), "nobody", "c", 50.0, 10, 0.0) == []
        assert await store.count() == 5
    finally:
        await store.aclose()


async def test_delete_by_scope_and_sweep_count_what_they_remove() -> None:
    store = EdgeVectorStore(None, DIM)
    try:
        await store.upsert(pid(1), vec(0), payload("a", model_class="fast", version="v1", until=10.0))
        await store.upsert(pid(2), vec(1), payload("a", model_class="fast", version="v2"))
        await store.upsert(pid(3), vec(2), payload("a", model_class="smart", version="v1"))
        await store.upsert(pid(4), vec(3), payload("b", model_class="fast", version="v1", until=10.0))
        assert await store.delete(InvalidationScope("a", model_class="fast", prompt_version="v2")) == 1
        assert await store.delete(InvalidationScope("a", model_class="fast", prompt_version="v2")) == 0
        assert await store.count() == 3
        assert await store.sweep(now=10.0) == 2
        assert await store.count() == 1
        assert await store.delete(InvalidationScope("b")) == 0
        assert await store.delete(InvalidationScope("a")) == 1
        assert await store.count() == 0
    finally:
        await store.aclose()


async def test_the_store_persists_under_its_path_with_background_optimisation_on(tmp_path: Path) -> None:
    path = tmp_path / "cache-vectors"
    store = EdgeVectorStore(path, DIM, indexing_threshold=10, optimize_every=20)
    for i in range(40):
        await store.upsert(pid(i + 1), vec(i % DIM, lean=(i + 1) % DIM), payload("a"))
    await store.aclose()
    again = EdgeVectorStore(path, DIM)
    try:
        assert await again.count() == 40
        found = await again.search(vec(3, lean=4), "a", "c", 0.0, 3, 0.99)
        assert sorted(c.point_id for c in found) == [pid(4), pid(20), pid(36)]
    finally:
        await again.aclose()
    tmp = EdgeVectorStore(None, DIM)
    folder = tmp._store.temp_dir
    assert folder is not None and folder.is_dir()
    await tmp.aclose()
    assert not folder.exists()


BOUND = 20


def bounded_store(kind: str, max_entries: int = BOUND) -> VectorStore:
    if kind == "edge":
        return EdgeVectorStore(None, DIM, max_entries=max_entries)
    from qdrant_client import AsyncQdrantClient

    return QdrantClientVectorStore(AsyncQdrantClient(location=":memory:"), "bounded", DIM, max_entries=max_entries)


async def present(store: VectorStore) -> set[str]:
    return {c.point_id for c in await store.search(vec(0), "a", "c", now=0.0, limit=1000, min_score=-1.0)}


@pytest.mark.parametrize("kind", ["edge", "qdrant-client"])
async def test_past_its_bound_a_store_evicts_the_oldest_entries_first(kind: str) -> None:
    """One TTL for all: retained-until grows with the age of the write, so the oldest go first."""
    store = bounded_store(kind)
    try:
        for i in range(1, 61):
            await store.upsert(pid(i), vec(0), payload("a", until=1000.0 + i))
            assert await store.count() <= BOUND, f"after write {i}"
        n = await store.count()
        # Evictions come in batches (down to 99 % of the bound), never below it by more than one batch.
        assert BOUND - BOUND // 100 <= n <= BOUND
        assert await present(store) == {pid(i) for i in range(61 - n, 61)}
        # Writing the same entries again replaces them: no eviction of anything else.
        for i in range(61 - n, 61):
            await store.upsert(pid(i), vec(0), payload("a", until=2000.0 + i))
        assert await present(store) == {pid(i) for i in range(61 - n, 61)}
    finally:
        await store.aclose()


@pytest.mark.parametrize("kind", ["edge", "qdrant-client"])
async def test_eviction_takes_the_entries_that_expire_soonest_first(kind: str) -> None:
    """A long-lived entry outlives newer short-lived ones: the bound evicts by retention, not by age."""
    store = bounded_store(kind)
    try:
        long_lived = {pid(i) for i in range(1, 11)}
        for i in range(1, 11):
            await store.upsert(pid(i), vec(0), payload("a", until=1e9))
        for i in range(11, 101):
            await store.upsert(pid(i), vec(0), payload("a", until=1000.0 + i))
        assert await store.count() <= BOUND
        left = await present(store)
        assert long_lived <= left
        assert left - long_lived == {pid(i) for i in range(101 - (len(left) - 10), 101)}
    finally:
        await store.aclose()


async def test_a_sweep_releases_what_it_deleted(tmp_path: Path) -> None:
    """Qdrant only marks a point deleted; the store has the optimizer vacuum it and a flush release the
    replaced segment, neither of which the embedded engine does on its own (the cache's memory grew without)."""
    path = tmp_path / "cache-vectors"
    store = EdgeVectorStore(path, DIM, indexing_threshold=10, optimize_every=10**9)
    try:
        for i in range(2000):
            await store.upsert(pid(i + 1), vec(i % DIM), payload("a", until=float(i)))
        await asyncio.to_thread(store.optimize_now)
        shard = store._store.shard
        assert shard.info().indexed_vectors_count == 2000
        assert await store.sweep(now=1499.0) == 1500  # retained until 1499 or before: gone
        await store.optimized()
        info = shard.info()
        assert (info.points_count, info.indexed_vectors_count) == (500, 500)  # vacuumed, not only marked
        assert len(list((path / "segments").iterdir())) == info.segments_count  # replaced segments released
        assert await store.search(vec(0), "a", "c", now=1499.0, limit=1, min_score=0.9) != []
    finally:
        await store.aclose()


def test_eviction_size_is_nothing_within_the_bound_and_a_batch_past_it() -> None:
    assert [eviction_size(n, 1000) for n in (0, 1000, 1001, 1500)] == [0, 0, 11, 510]
    assert [eviction_size(n, 10) for n in (10, 11, 12)] == [0, 1, 2]
