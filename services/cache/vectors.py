"""Vector stores for the semantic tier: Qdrant in process (qdrant-edge, HNSW) or a Qdrant server.

Every point carries its tenant and its *context id* (the hash of the namespace, model,
answer-changing parameters and every earlier turn: see ``semantic.context_id``); a search
always filters on both, so a lookup can only ever find entries of the same tenant and the
same conversation prefix. Retention is a payload field (``retain_until``) that searches
filter on and sweeps delete: Qdrant has no TTL of its own.

``EdgeVectorStore`` runs the engine inside the service (``qdrant-edge-py``, through the mesh's
one vector-store abstraction, ``libs.vector_store``): HNSW, no network hop, one shard on disk
under the data dir. ``QdrantClientVectorStore`` speaks to
a Qdrant server or cluster (``TOLLGATE_QDRANT_URL``) through qdrant-client; with
``location=":memory:"`` the same class runs qdrant-client's local mode (brute force, for
comparison only: see tests/bench/bench_cache.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from libs.vector_store import (
    Condition,
    EdgePointStore,
    Filter,
    HnswSettings,
    IndexKind,
    Match,
    Point,
    Range,
    SearchRequest,
    ShardConfig,
)
from services.cache.domain import InvalidationScope

log = logging.getLogger(__name__)

# Payload fields the stores filter on (and index).
TENANT = "tenant"
CONTEXT = "ctx"
MODEL_CLASS = "model_class"
PROMPT_VERSION = "prompt_version"
RETAIN_UNTIL = "retain_until"


@dataclass(frozen=True)
class Candidate:
    point_id: str
    score: float  # cosine similarity
    payload: Mapping[str, Any]


class VectorStore(Protocol):
    """Raises on backend faults; the semantic tier turns those into "exact tier only"."""

    async def search(self, vector: np.ndarray, tenant_id: str, context: str, now: float,
                     limit: int, min_score: float) -> list[Candidate]: ...

    async def upsert(self, point_id: str, vector: np.ndarray, payload: Mapping[str, Any]) -> None: ...

    async def delete(self, scope: InvalidationScope) -> int:
        """Remove the scope's points; returns how many there were."""
        ...

    async def sweep(self, now: float) -> int:
        """Remove points retained no longer; returns how many."""
        ...

    async def count(self) -> int: ...

    async def aclose(self) -> None: ...


def _scope_conditions(scope: InvalidationScope) -> list[tuple[str, str]]:
    conds = [(TENANT, scope.tenant_id)]
    if scope.model_class is not None:
        conds.append((MODEL_CLASS, scope.model_class))
    if scope.prompt_version is not None:
        conds.append((PROMPT_VERSION, scope.prompt_version))
    return conds


def _filter(conds: Sequence[tuple[str, str]], retained_after: float | None = None) -> Filter:
    must: list[Condition] = [Match(k, v) for k, v in conds]
    if retained_after is not None:
        must.append(Range(RETAIN_UNTIL, gt=retained_after))
    return Filter(must=tuple(must))


class EdgeVectorStore:
    """Qdrant's engine in process (qdrant-edge-py): one HNSW shard (``libs.vector_store.EdgePointStore``),
    searched inline.

    A search at 100k points takes well under a millisecond, less than a thread hop would
    cost, so it runs on the event loop; writes are short too. Building the HNSW index of
    freshly written points (``optimize``) can take seconds and runs in a worker thread,
    in the background, whenever enough new points have arrived.
    """

    def __init__(self, path: Path | None, dim: int, *, hnsw_m: int = 16, hnsw_ef_construct: int = 100,
                 hnsw_ef: int = 64, indexing_threshold: int = 10_000, optimize_every: int = 5_000):
        config = ShardConfig(
            dim=dim,
            indexes={TENANT: IndexKind.KEYWORD, CONTEXT: IndexKind.KEYWORD, MODEL_CLASS: IndexKind.KEYWORD,
                     PROMPT_VERSION: IndexKind.KEYWORD, RETAIN_UNTIL: IndexKind.FLOAT},
            hnsw=HnswSettings(m=hnsw_m, ef_construct=hnsw_ef_construct, indexing_threshold=indexing_threshold,
                              max_indexing_threads=1),
            # One search thread: the service has its own concurrency, and the machine two cores.
            max_search_threads=1,
        )
        self._store = EdgePointStore.open(path, config, temp_prefix="tollgate-cache-vectors-")
        self._hnsw_ef = hnsw_ef
        self._optimize_every = optimize_every
        self._since_optimize = 0
        self._optimizing: asyncio.Task[None] | None = None

    async def search(self, vector: np.ndarray, tenant_id: str, context: str, now: float,
                     limit: int, min_score: float) -> list[Candidate]:
        request = SearchRequest(limit=limit, dense=vector,
                                filter=_filter([(TENANT, tenant_id), (CONTEXT, context)], now),
                                score_threshold=min_score, hnsw_ef=self._hnsw_ef)
        return [Candidate(h.id, h.score, h.payload) for h in self._store.search(request)]

    async def upsert(self, point_id: str, vector: np.ndarray, payload: Mapping[str, Any]) -> None:
        self._store.upsert([Point(point_id, vector, payload)])
        self._since_optimize += 1
        if self._since_optimize >= self._optimize_every and self._optimizing is None:
            self._since_optimize = 0
            self._optimizing = asyncio.create_task(self._optimize(), name="cache-vectors-optimize")

    async def _optimize(self) -> None:
        try:
            await asyncio.to_thread(self.optimize_now)
        except Exception:
            log.exception("vector index optimisation failed")
        finally:
            self._optimizing = None

    def optimize_now(self) -> None:
        """Build the HNSW index of what was written since the last time (blocking)."""
        self._store.optimize()

    def _delete_counted(self, flt: Filter) -> int:
        n = self._store.count(flt)
        if n:
            self._store.delete(flt)
        return n

    async def delete(self, scope: InvalidationScope) -> int:
        return self._delete_counted(_filter(_scope_conditions(scope)))

    async def sweep(self, now: float) -> int:
        return self._delete_counted(Filter(must=(Range(RETAIN_UNTIL, lte=now),)))

    async def count(self) -> int:
        return self._store.count()

    async def aclose(self) -> None:
        task = self._optimizing
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        self._store.close()


class QdrantClientVectorStore:
    """A Qdrant server or cluster through qdrant-client (or its local mode, for comparison)."""

    def __init__(self, client: Any, collection: str, dim: int, *, timeout_s: float = 1.0, hnsw_ef: int = 64):
        from qdrant_client import models

        self._m = models
        self._client = client
        self._collection = collection
        self._dim = dim
        self._timeout_s = timeout_s
        self._params = models.SearchParams(hnsw_ef=hnsw_ef)
        self._ready = False

    @classmethod
    def connect(cls, url: str, api_key: str, collection: str, dim: int, *, timeout_s: float) -> QdrantClientVectorStore:
        from qdrant_client import AsyncQdrantClient

        client = AsyncQdrantClient(url=url, api_key=api_key or None, timeout=max(1, int(timeout_s + 0.999)))
        return cls(client, collection, dim, timeout_s=timeout_s)

    async def _ensure(self) -> None:
        if self._ready:
            return
        m = self._m
        if not await self._client.collection_exists(self._collection):
            await self._client.create_collection(
                self._collection, vectors_config=m.VectorParams(size=self._dim, distance=m.Distance.COSINE))
            for field, schema in ((TENANT, m.PayloadSchemaType.KEYWORD), (CONTEXT, m.PayloadSchemaType.KEYWORD),
                                  (MODEL_CLASS, m.PayloadSchemaType.KEYWORD),
                                  (PROMPT_VERSION, m.PayloadSchemaType.KEYWORD),
                                  (RETAIN_UNTIL, m.PayloadSchemaType.FLOAT)):
                await self._client.create_payload_index(self._collection, field, schema)
        self._ready = True

    def _filter(self, conds: Sequence[tuple[str, str]], retained_after: float | None = None) -> Any:
        m = self._m
        must: list[Any] = [m.FieldCondition(key=k, match=m.MatchValue(value=v)) for k, v in conds]
        if retained_after is not None:
            must.append(m.FieldCondition(key=RETAIN_UNTIL, range=m.Range(gt=retained_after)))
        return m.Filter(must=must)

    async def search(self, vector: np.ndarray, tenant_id: str, context: str, now: float,
                     limit: int, min_score: float) -> list[Candidate]:
        await self._ensure()
        res = await self._client.query_points(
            self._collection, query=vector.tolist(), limit=limit, with_payload=True, score_threshold=min_score,
            query_filter=self._filter([(TENANT, tenant_id), (CONTEXT, context)], now), search_params=self._params)
        return [Candidate(str(p.id), float(p.score), p.payload or {}) for p in res.points]

    async def upsert(self, point_id: str, vector: np.ndarray, payload: Mapping[str, Any]) -> None:
        await self._ensure()
        await self._client.upsert(self._collection, wait=False,
                                  points=[self._m.PointStruct(id=point_id, vector=vector.tolist(),
                                                              payload=dict(payload))])

    async def delete(self, scope: InvalidationScope) -> int:
        await self._ensure()
        flt = self._filter(_scope_conditions(scope))
        n = (await self._client.count(self._collection, count_filter=flt, exact=True)).count
        if n:
            await self._client.delete(self._collection, points_selector=self._m.FilterSelector(filter=flt), wait=True)
        return int(n)

    async def sweep(self, now: float) -> int:
        await self._ensure()
        flt = self._m.Filter(must=[self._m.FieldCondition(key=RETAIN_UNTIL, range=self._m.Range(lte=now))])
        n = (await self._client.count(self._collection, count_filter=flt, exact=True)).count
        if n:
            await self._client.delete(self._collection, points_selector=self._m.FilterSelector(filter=flt), wait=True)
        return int(n)

    async def count(self) -> int:
        await self._ensure()
        return int((await self._client.count(self._collection, exact=True)).count)

    async def aclose(self) -> None:
        await self._client.close()


def monotonic() -> float:
    return time.monotonic()
