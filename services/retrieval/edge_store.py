"""``EdgeVectorStore``: the embedded default, Qdrant's own engine in-process (``qdrant-edge-py``).

qdrant-client's local mode is a pure-Python brute force that evaluates filters
point by point in Python: over 50k chunks a tenant-filtered dense search took
~0.6 s and a hybrid one ~3 s here. Qdrant Edge is the Rust engine of the
server as a library: payload indexes (the tenant field is indexed with
``is_tenant``), sparse inverted index with the IDF modifier, Query API with
prefetch and RRF, a write-ahead log on disk; the same search takes ~1-2 ms
(``tests/bench/bench_retrieval.py``). The point layout, filters and scoring are
the same as :class:`~services.retrieval.store.QdrantVectorStore`'s, so a
deployment can move to a Qdrant server by setting ``TOLLGATE_QDRANT_URL``.

One shard is one collection, in ``<data_dir>/qdrant-edge/<collection>``; with no
data dir it lives in a temporary folder removed on close. A shard is opened by
one process at a time (its WAL is locked): a second opener gets UNAVAILABLE.
The engine is thread-safe, so calls are not serialised. The shard itself, the
filters and the call discipline are the mesh's one vector-store abstraction
(``libs.vector_store``); this module only maps chunks and chunk filters onto it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from libs.deadlines import Deadline
from libs.vector_store import (
    BlockingStore,
    Condition,
    EdgePointStore,
    Filter,
    IndexKind,
    Match,
    MatchAny,
    Point,
    Range,
    SearchRequest,
    ShardConfig,
)
from services.retrieval.store import (
    DENSE_VECTOR,
    QDRANT_RRF_K,
    SPARSE_VECTOR,
    ChunkFilter,
    ChunkRecord,
    ScoredChunk,
    StoreQuery,
    chunk_payload,
    metadata_term,
    point_id,
    scored_chunk,
)

_UPSERT_BATCH = 512

# The tenant index is what keeps a tenant-filtered search cheap.
_INDEXES = {
    "tenant_id": IndexKind.TENANT,
    "document_id": IndexKind.KEYWORD,
    "metadata_kv": IndexKind.KEYWORD,
    "chunk_index": IndexKind.INTEGER,
}


def chunk_filter(where: ChunkFilter) -> Filter:
    """The payload filter for ``where``; the tenant condition comes first and is always present."""
    must: list[Condition] = [Match("tenant_id", where.tenant_id)]
    if where.document_ids is not None:
        must.append(MatchAny("document_id", tuple(where.document_ids)))
    for key, value in sorted(where.metadata.items()):
        must.append(Match("metadata_kv", metadata_term(key, value)))
    return Filter(must=tuple(must))


class EdgeVectorStore(BlockingStore[EdgePointStore]):
    """:class:`~services.retrieval.store.VectorStore` on an in-process Qdrant Edge shard."""

    def __init__(self, path: Path | None, *, dim: int, call_timeout_s: float = 5.0,
                 dense_vector: str = DENSE_VECTOR) -> None:
        self._path = path
        self._config = ShardConfig(dim=dim, dense_vector=dense_vector, sparse_vector=SPARSE_VECTOR,
                                   indexes=_INDEXES)
        super().__init__(self._open, serialise=False, call_timeout_s=call_timeout_s)

    def _open(self) -> EdgePointStore:
        return EdgePointStore.open(self._path, self._config, temp_prefix="tollgate-edge-")

    def _prepare(self, client: EdgePointStore) -> None:
        client.ensure_indexes()

    def _close_client(self, client: EdgePointStore) -> None:
        client.close()

    # -- VectorStore -------------------------------------------------------------------------

    async def upsert(self, tenant_id: str, chunks: Sequence[ChunkRecord], deadline: Deadline) -> None:
        if not tenant_id:
            raise ValueError("upsert needs a tenant")
        points = [Point(point_id(tenant_id, c.document_id, c.chunk_index), c.vector, chunk_payload(tenant_id, c),
                        sparse=c.sparse)
                  for c in chunks]
        for start in range(0, len(points), _UPSERT_BATCH):
            await self._upsert_batch(points[start:start + _UPSERT_BATCH], deadline)

    async def _upsert_batch(self, batch: list[Point], deadline: Deadline) -> None:
        await self._call("upsert", lambda cl: cl.upsert(batch), deadline)

    async def delete_stale(self, tenant_id: str, chunk_counts: Mapping[str, int], deadline: Deadline) -> None:
        if not chunk_counts:
            return
        stale = Filter(
            must=(Match("tenant_id", tenant_id),),
            should=tuple(Filter(must=(Match("document_id", doc), Range("chunk_index", gte=float(count))))
                         for doc, count in sorted(chunk_counts.items())),
        )
        await self._call("delete_stale", lambda cl: cl.delete(stale), deadline)

    async def search(self, where: ChunkFilter, query: StoreQuery, limit: int,
                     deadline: Deadline) -> list[ScoredChunk]:
        request = SearchRequest(
            limit=limit, filter=chunk_filter(where), dense=query.dense,
            sparse=query.sparse if query.sparse else None, prefetch_limit=query.prefetch_limit, rrf_k=QDRANT_RRF_K,
            # IDF over the caller's own tenant only: other tenants' documents never move its scores.
            idf_corpus=chunk_filter(ChunkFilter(where.tenant_id)))
        hits = await self._call("search", lambda cl: cl.search(request), deadline)
        return [hit for h in hits if (hit := scored_chunk(where.tenant_id, h.payload, h.score)) is not None]

    async def count(self, where: ChunkFilter, deadline: Deadline) -> int:
        flt = chunk_filter(where)
        return await self._call("count", lambda cl: cl.count(flt), deadline)

    async def delete(self, where: ChunkFilter, deadline: Deadline) -> None:
        flt = chunk_filter(where)
        await self._call("delete", lambda cl: cl.delete(flt), deadline)
