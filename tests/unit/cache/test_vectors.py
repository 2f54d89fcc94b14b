"""The semantic tier's embedded vector store (services.cache.vectors.EdgeVectorStore over libs.vector_store),
with hand-made vectors: tenant and context isolation, retention, invalidation scopes, sweeps, persistence."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from services.cache.domain import InvalidationScope
from services.cache.vectors import CONTEXT, MODEL_CLASS, PROMPT_VERSION, RETAIN_UNTIL, TENANT, EdgeVectorStore

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
