"""Vector stores for the semantic tier: Qdrant in process (qdrant-edge, HNSW) or a Qdrant server.

Every point carries its tenant and its *context id* (the hash of the namespace, model,
answer-changing parameters and every earlier turn: see ``semantic.context_id``); a search
always filters on both, so a lookup can only ever find entries of the same tenant and the
same conversation prefix. Retention is a payload field (``retain_until``) that searches
filter on and sweeps delete: Qdrant has no TTL of its own. Nor has it a capacity bound: past
``max_entries`` points a store evicts those retained the shortest (the soonest to expire; with
one TTL, the oldest), so its size is bounded whatever the TTLs and the stale window.

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


# The most points a store keeps unless told otherwise (TOLLGATE_CACHE_SEMANTIC_MAX_ENTRIES).
DEFAULT_MAX_ENTRIES = 50_000


def eviction_size(count: int, max_entries: int) -> int:
    """How many points a store holding ``count`` evicts: none within its bound; past it, down to 99 % of the
    bound, so that evictions come in batches (one ordered scroll and one delete per 1 % of the bound written,
    some 20 ms at 50,000 points: small enough to run on the event loop) rather than on every write."""
    if count <= max_entries:
        return 0
    return count - (max_entries - max_entries // 100)


def _log_eviction(max_entries: int, evicted: int, *, first: bool) -> None:
    # Once at info (the bound is reached: from then on every 1 % of it written evicts as much), then at debug.
    log.log(logging.INFO if first else logging.DEBUG,
            "vector store past its bound of %d points: evicted the %d retained the shortest", max_entries, evicted)


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
    freshly written points and vacuuming deleted ones (``optimize_now``) can take seconds
    and runs in a worker thread, in the background, whenever enough new points have arrived
    and after every sweep, eviction or invalidation that removed some: the embedded engine
    never optimises or flushes on its own, and a deleted point keeps its memory until both
    have run (see ``EdgePointStore.optimize``).
    """

    def __init__(self, path: Path | None, dim: int, *, max_entries: int = DEFAULT_MAX_ENTRIES, hnsw_m: int = 16,
                 hnsw_ef_construct: int = 100, hnsw_ef: int = 64, indexing_threshold: int = 10_000,
                 optimize_every: int = 5_000):
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
        self._max_entries = max_entries
        # The points in the shard or more (a write that replaced a point counted one more): counted for real
        # whenever this passes the bound, so a write costs no count until then.
        self._points = self._store.count()
        self._optimize_every = optimize_every
        self._since_optimize = 0
        self._optimizing: asyncio.Task[None] | None = None
        self._optimize_again = False
        self._evicted = False

    async def search(self, vector: np.ndarray, tenant_id: str, context: str, now: float,
                     limit: int, min_score: float) -> list[Candidate]:
        request = SearchRequest(limit=limit, dense=vector,
                                filter=_filter([(TENANT, tenant_id), (CONTEXT, context)], now),
                                score_threshold=min_score, hnsw_ef=self._hnsw_ef)
        return [Candidate(h.id, h.score, h.payload) for h in self._store.search(request)]

    async def upsert(self, point_id: str, vector: np.ndarray, payload: Mapping[str, Any]) -> None:
        self._store.upsert([Point(point_id, vector, payload)])
        self._points += 1
        if self._points > self._max_entries:
            self._evict()
        self._since_optimize += 1
        if self._since_optimize >= self._optimize_every:
            self._optimize_later()

    def _evict(self) -> None:
        # Hand-written because Qdrant has no capacity bound (nor TTL); the retention index orders the points
        # by how long they are kept, so one ordered scroll finds those to go.
        n = self._store.count()
        excess = eviction_size(n, self._max_entries)
        if excess:
            doomed = self._store.lowest(RETAIN_UNTIL, excess)
            self._store.delete_ids(doomed)
            n -= len(doomed)
            _log_eviction(self._max_entries, len(doomed), first=not self._evicted)
            self._evicted = True
            self._optimize_later()
        self._points = n

    def _optimize_later(self) -> None:
        """Optimise (and flush) in a worker thread, in the background; once more after the run under way."""
        self._since_optimize = 0
        if self._optimizing is not None:
            self._optimize_again = True
            return
        self._optimizing = asyncio.create_task(self._optimize(), name="cache-vectors-optimize")

    async def _optimize(self) -> None:
        try:
            again = True
            while again:
                self._optimize_again = False
                try:
                    await asyncio.to_thread(self.optimize_now)
                except Exception:
                    log.exception("vector index optimisation failed")
                again = self._optimize_again
        finally:
            self._optimizing = None

    def optimize_now(self) -> None:
        """Index what was written since the last time, vacuum what was deleted, flush (blocking)."""
        self._store.optimize()

    async def optimized(self) -> None:
        """Wait for the background optimisation under way, if any (tests, benchmarks)."""
        while (task := self._optimizing) is not None:
            await asyncio.gather(task, return_exceptions=True)

    def _delete_counted(self, flt: Filter) -> int:
        n = self._store.count(flt)
        if n:
            self._store.delete(flt)
            self._points -= n
            self._optimize_later()
        return n

    async def delete(self, scope: InvalidationScope) -> int:
        return self._delete_counted(_filter(_scope_conditions(scope)))

    async def sweep(self, now: float) -> int:
        return self._delete_counted(Filter(must=(Range(RETAIN_UNTIL, lte=now),)))

    async def count(self) -> int:
        return self._store.count()

    async def aclose(self) -> None:
        await self.optimized()
        self._store.close()


class QdrantClientVectorStore:
    """A Qdrant server or cluster through qdrant-client (or its local mode, for comparison)."""

    def __init__(self, client: Any, collection: str, dim: int, *, timeout_s: float = 1.0, hnsw_ef: int = 64,
                 max_entries: int = DEFAULT_MAX_ENTRIES):
        from qdrant_client import models

        self._m = models
        self._client = client
        self._collection = collection
        self._dim = dim
        self._timeout_s = timeout_s
        self._params = models.SearchParams(hnsw_ef=hnsw_ef)
        self._ready = False
        self._max_entries = max_entries
        # As in EdgeVectorStore: the points or more (None: not counted yet), counted for real past the bound.
        # The server optimises and flushes on its own; only the bound is this store's to keep.
        self._points: int | None = None
        self._evicted = False

    @classmethod
    def connect(cls, url: str, api_key: str, collection: str, dim: int, *, timeout_s: float,
                max_entries: int = DEFAULT_MAX_ENTRIES) -> QdrantClientVectorStore:
        from qdrant_client import AsyncQdrantClient

        client = AsyncQdrantClient(url=url, api_key=api_key or None, timeout=max(1, int(timeout_s + 0.999)))
        return cls(client, collection, dim, timeout_s=timeout_s, max_entries=max_entries)

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
        self._points = None if self._points is None else self._points + 1
        if self._points is None or self._points > self._max_entries:
            await self._evict()

    async def _evict(self) -> None:
        m = self._m
        n = int((await self._client.count(self._collection, exact=True)).count)
        excess = eviction_size(n, self._max_entries)
        if excess:
            doomed, _ = await self._client.scroll(
                self._collection, limit=excess, with_payload=False, with_vectors=False,
                order_by=m.OrderBy(key=RETAIN_UNTIL, direction=m.Direction.ASC))
            await self._client.delete(self._collection, points_selector=m.PointIdsList(points=[p.id for p in doomed]),
                                      wait=True)
            n -= len(doomed)
            _log_eviction(self._max_entries, len(doomed), first=not self._evicted)
            self._evicted = True
        self._points = n

    async def delete(self, scope: InvalidationScope) -> int:
        await self._ensure()
        return await self._delete_counted(self._filter(_scope_conditions(scope)))

    async def sweep(self, now: float) -> int:
        await self._ensure()
        return await self._delete_counted(
            self._m.Filter(must=[self._m.FieldCondition(key=RETAIN_UNTIL, range=self._m.Range(lte=now))]))

    async def _delete_counted(self, flt: Any) -> int:
        n = int((await self._client.count(self._collection, count_filter=flt, exact=True)).count)
        if n:
            await self._client.delete(self._collection, points_selector=self._m.FilterSelector(filter=flt), wait=True)
            if self._points is not None:
                self._points -= n
        return n

    async def count(self) -> int:
        await self._ensure()
        return int((await self._client.count(self._collection, exact=True)).count)

    async def aclose(self) -> None:
        await self._client.close()


def monotonic() -> float:
    return time.monotonic()
