"""Vector storage of document chunks: the ``VectorStore`` protocol and the qdrant-client implementation.

Each chunk is one point with two vectors: a dense one (the embedder's, named
after it, so vectors of another model never mix in) and a sparse BM25 one
(``bm25``, with the collection's IDF modifier). A search runs the dense
retriever, the sparse one, or both fused by Reciprocal Rank Fusion (k = 60)
inside the store, in one call (Qdrant's Query API: one prefetch per retriever,
each carrying the tenant filter, then an RRF query).

Two backends implement the protocol: :class:`QdrantVectorStore` (a Qdrant
server via qdrant-client; also qdrant-client's local mode, a pure-Python brute
force kept for comparison) and ``EdgeVectorStore`` (``services.retrieval.edge_store``,
the embedded default: Qdrant's engine in-process). Both run their blocking client
through ``libs.vector_store.BlockingStore`` (worker thread, per-call timeout,
lazy reconnection).

Every read and delete goes through a :class:`ChunkFilter`, whose ``tenant_id``
is mandatory and always becomes a ``must`` condition; caller metadata is
matched only against the ``metadata_kv`` payload field, so no metadata key can
reach the real ``tenant_id`` (or any other system) field.

Payload of a point::

    tenant_id, document_id, chunk_id, chunk_index, text,
    metadata      {key: value}           returned with hits
    metadata_kv   ['["key", "value"]']   what metadata filters match (any key, even "a.b" or "tenant_id")

Vectors of a point::

    <dense name>  the embedder's vector (cosine)
    bm25          BM25 term weights (sparse; IDF applied by the collection, per tenant)

Point ids are ``uuid5(tenant, document, chunk_index)``, so writing the same
chunk twice overwrites it instead of duplicating it.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from qdrant_client import QdrantClient, models

from libs.deadlines import Deadline
from libs.errors import FailedPrecondition
from libs.vector_store import BlockingStore
from services.retrieval.sparse import SparseVector

log = logging.getLogger(__name__)

DENSE_VECTOR = "dense"
SPARSE_VECTOR = "bm25"
# Reciprocal Rank Fusion: score(chunk) = sum over retrievers of 1 / (RRF_K + rank), rank counted from 1
# (Cormack et al. 2009). Qdrant counts positions from 0 (1 / (k + position)), so it is given RRF_K + 1.
RRF_K = 60
QDRANT_RRF_K = RRF_K + 1
_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://tollgate.dev/retrieval/chunk")
_UPSERT_BATCH = 256


def point_id(tenant_id: str, document_id: str, chunk_index: int) -> str:
    """Deterministic Qdrant point id of a chunk (JSON-encoded so no separator can be forged)."""
    return str(uuid.uuid5(_POINT_NAMESPACE, json.dumps([tenant_id, document_id, chunk_index])))


def chunk_id(document_id: str, chunk_index: int) -> str:
    """Caller-visible id of a chunk, unique within a tenant."""
    return f"{document_id}#{chunk_index}"


def metadata_term(key: str, value: str) -> str:
    """The ``metadata_kv`` entry for one metadata pair (unambiguous for any key and value)."""
    return json.dumps([key, value], ensure_ascii=False)


@dataclass(frozen=True)
class ChunkRecord:
    """A chunk to store (the tenant is given separately, by the caller's identity)."""

    document_id: str
    chunk_index: int
    text: str
    metadata: Mapping[str, str]
    vector: npt.NDArray[np.float32]
    sparse: SparseVector = field(default_factory=lambda: SparseVector((), ()))


class SearchMode(enum.StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class StoreQuery:
    """What to search with: a dense vector, a sparse one, or both (fused by RRF).

    ``prefetch_limit`` is how many candidates each retriever hands to the fusion.
    """

    dense: npt.NDArray[np.float32] | None = None
    sparse: SparseVector | None = None
    prefetch_limit: int = 100

    def __post_init__(self) -> None:
        if self.dense is None and not self.sparse:
            raise ValueError("a store query needs a dense or a non-empty sparse vector")


@dataclass(frozen=True)
class ChunkFilter:
    """Which chunks an operation may touch: always exactly one tenant's, optionally narrowed."""

    tenant_id: str
    # Any of these documents (None: all documents of the tenant).
    document_ids: tuple[str, ...] | None = None
    # All of these exact metadata pairs.
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tenant_id:
            raise ValueError("a chunk filter needs a tenant")


@dataclass(frozen=True)
class ScoredChunk:
    chunk_id: str
    document_id: str
    chunk_index: int
    text: str
    score: float
    metadata: dict[str, str]


class VectorStore(Protocol):
    """Where chunk vectors live. Backend faults surface as ``libs.errors.Unavailable``."""

    async def start(self, deadline: Deadline) -> None:
        """Connect and make sure the collection exists."""
        ...

    async def close(self) -> None: ...

    async def upsert(self, tenant_id: str, chunks: Sequence[ChunkRecord], deadline: Deadline) -> None: ...

    async def delete_stale(self, tenant_id: str, chunk_counts: Mapping[str, int], deadline: Deadline) -> None:
        """For each document, delete its chunks with ``chunk_index >= chunk_counts[document_id]``."""
        ...

    async def search(self, where: ChunkFilter, query: StoreQuery, limit: int,
                     deadline: Deadline) -> list[ScoredChunk]:
        """The ``limit`` best chunks matching ``where``, best first (fused by RRF when both vectors are given)."""
        ...

    async def count(self, where: ChunkFilter, deadline: Deadline) -> int: ...

    async def delete(self, where: ChunkFilter, deadline: Deadline) -> None: ...


def _match(key: str, value: str | int) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def chunk_payload(tenant_id: str, c: ChunkRecord) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "document_id": c.document_id,
        "chunk_id": chunk_id(c.document_id, c.chunk_index),
        "chunk_index": c.chunk_index,
        "text": c.text,
        "metadata": dict(c.metadata),
        "metadata_kv": [metadata_term(k, v) for k, v in sorted(c.metadata.items())],
    }


def scored_chunk(tenant_id: str, payload: Mapping[str, Any] | None, score: float) -> ScoredChunk | None:
    """The hit for a returned point, or None when it is not the tenant's (belt and braces: filters ensure it)."""
    payload = payload or {}
    if payload.get("tenant_id") != tenant_id:
        return None
    metadata = payload.get("metadata") or {}
    return ScoredChunk(
        chunk_id=str(payload.get("chunk_id", "")),
        document_id=str(payload.get("document_id", "")),
        chunk_index=int(payload.get("chunk_index", 0)),
        text=str(payload.get("text", "")),
        score=float(score),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )


def to_qdrant_filter(where: ChunkFilter) -> models.Filter:
    """The Qdrant filter for ``where``; the tenant condition comes first and is always present."""
    must: list[models.Condition] = [_match("tenant_id", where.tenant_id)]
    if where.document_ids is not None:
        must.append(models.FieldCondition(key="document_id", match=models.MatchAny(any=list(where.document_ids))))
    for key, value in sorted(where.metadata.items()):
        must.append(_match("metadata_kv", metadata_term(key, value)))
    return models.Filter(must=must)


def _qdrant_sparse(vec: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vec.indices), values=list(vec.values))


class QdrantVectorStore(BlockingStore[QdrantClient]):
    """:class:`VectorStore` on qdrant-client: a Qdrant server, or local mode (on disk or in memory).

    Local mode is qdrant-client's pure-Python engine: brute force over every
    point with filters evaluated in Python (~0.6 s a dense search over 50k
    chunks here), single-process and not thread-safe, so its calls are
    serialised. It stays for comparison and tests; the embedded default is
    ``EdgeVectorStore``. Hybrid search needs a server with parametrised RRF and
    per-tenant IDF (Qdrant >= 1.16).
    """

    def __init__(self, client_factory: Callable[[], QdrantClient], *, collection: str, dim: int,
                 local: bool, call_timeout_s: float = 5.0, dense_vector: str = DENSE_VECTOR) -> None:
        super().__init__(client_factory, serialise=local, call_timeout_s=call_timeout_s)
        self._collection = collection
        self._dim = dim
        self._local = local
        self._dense = dense_vector

    @classmethod
    def create(cls, *, url: str, api_key: str, path: Path | None, collection: str, dim: int,
               call_timeout_s: float, dense_vector: str = DENSE_VECTOR) -> QdrantVectorStore:
        """A server client when ``url`` is set, else local mode at ``path`` (in memory when None)."""
        if url:
            def factory() -> QdrantClient:
                # No version probe at construction: it would block start-up while the server is down.
                return QdrantClient(url=url, api_key=api_key or None, timeout=max(1, int(call_timeout_s + 0.999)),
                                    check_compatibility=False)
            return cls(factory, collection=collection, dim=dim, local=False, call_timeout_s=call_timeout_s,
                       dense_vector=dense_vector)

        def local_factory() -> QdrantClient:
            if path is None:
                return QdrantClient(location=":memory:", force_disable_check_same_thread=True)
            path.mkdir(parents=True, exist_ok=True)
            return QdrantClient(path=str(path), force_disable_check_same_thread=True)

        return cls(local_factory, collection=collection, dim=dim, local=True, call_timeout_s=call_timeout_s,
                   dense_vector=dense_vector)

    @property
    def is_local(self) -> bool:
        return self._local

    def _close_client(self, client: QdrantClient) -> None:
        client.close()

    def _prepare(self, client: QdrantClient) -> None:
        if not client.collection_exists(self._collection):
            try:
                client.create_collection(
                    self._collection,
                    vectors_config={self._dense: models.VectorParams(size=self._dim,
                                                                     distance=models.Distance.COSINE)},
                    sparse_vectors_config={SPARSE_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)},
                )
                log.info("created collection %s (%s, dim %d)", self._collection, self._dense, self._dim)
            except Exception:
                # Another replica may have created it in between; anything else is a real failure.
                if not client.collection_exists(self._collection):
                    raise
        self._check_collection(client)
        if not self._local:
            self._create_payload_indexes(client)

    def _create_payload_indexes(self, client: QdrantClient) -> None:
        """Indexes that make tenant/document/metadata filters cheap on a server (local mode has none).

        Best effort: idempotent on the server, and a failure (an old server without
        ``is_tenant``, say) costs speed, not correctness, so it is logged, not raised.
        """
        indexes: list[tuple[str, models.PayloadSchemaType | models.KeywordIndexParams]] = [
            ("tenant_id", models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)),
            ("document_id", models.PayloadSchemaType.KEYWORD),
            ("metadata_kv", models.PayloadSchemaType.KEYWORD),
            ("chunk_index", models.PayloadSchemaType.INTEGER),
        ]
        for field_name, schema in indexes:
            try:
                client.create_payload_index(self._collection, field_name, field_schema=schema, wait=True)
            except Exception as exc:
                log.warning("payload index on %s not created: %s", field_name, type(exc).__name__)

    def _check_collection(self, client: QdrantClient) -> None:
        params_all = client.get_collection(self._collection).config.params
        vectors = params_all.vectors
        params = vectors.get(self._dense) if isinstance(vectors, dict) else None
        sparse = (params_all.sparse_vectors or {}).get(SPARSE_VECTOR)
        if params is None or params.size != self._dim or params.distance != models.Distance.COSINE:
            raise FailedPrecondition(
                f"collection {self._collection!r} does not have a {self._dim}-dim cosine vector {self._dense!r} "
                "(made with another embedder?); use another collection name or re-create it",
                reason="COLLECTION_MISMATCH",
            )
        if sparse is None or sparse.modifier != models.Modifier.IDF:
            raise FailedPrecondition(
                f"collection {self._collection!r} has no sparse vector {SPARSE_VECTOR!r} with the IDF modifier; "
                "use another collection name or re-create it",
                reason="COLLECTION_MISMATCH",
            )

    # -- VectorStore -------------------------------------------------------------------------

    async def upsert(self, tenant_id: str, chunks: Sequence[ChunkRecord], deadline: Deadline) -> None:
        if not tenant_id:
            raise ValueError("upsert needs a tenant")
        points = [
            models.PointStruct(
                id=point_id(tenant_id, c.document_id, c.chunk_index),
                vector={self._dense: c.vector.astype(np.float32).tolist(), SPARSE_VECTOR: _qdrant_sparse(c.sparse)},
                payload=chunk_payload(tenant_id, c),
            )
            for c in chunks
        ]
        for start in range(0, len(points), _UPSERT_BATCH):
            await self._upsert_batch(points[start:start + _UPSERT_BATCH], deadline)

    async def _upsert_batch(self, batch: list[models.PointStruct], deadline: Deadline) -> None:
        await self._call("upsert", lambda cl: cl.upsert(self._collection, points=batch, wait=True), deadline)

    async def delete_stale(self, tenant_id: str, chunk_counts: Mapping[str, int], deadline: Deadline) -> None:
        if not chunk_counts:
            return
        stale = models.Filter(
            must=[_match("tenant_id", tenant_id)],
            should=[
                models.Filter(must=[_match("document_id", doc),
                                    models.FieldCondition(key="chunk_index", range=models.Range(gte=count))])
                for doc, count in sorted(chunk_counts.items())
            ],
        )
        await self._call("delete_stale", lambda cl: cl.delete(
            self._collection, points_selector=models.FilterSelector(filter=stale), wait=True), deadline)

    async def search(self, where: ChunkFilter, query: StoreQuery, limit: int,
                     deadline: Deadline) -> list[ScoredChunk]:
        flt = to_qdrant_filter(where)
        # IDF over the caller's own tenant only: other tenants' documents never move its scores.
        sparse_params = models.SearchParams(idf=models.IdfCorpusParams(corpus=to_qdrant_filter(
            ChunkFilter(where.tenant_id))))
        dense = query.dense.astype(np.float32).tolist() if query.dense is not None else None
        sparse = _qdrant_sparse(query.sparse) if query.sparse else None

        def run(cl: QdrantClient) -> models.QueryResponse:
            if dense is not None and sparse is not None:
                return cl.query_points(
                    self._collection,
                    prefetch=[
                        models.Prefetch(query=dense, using=self._dense, filter=flt, limit=query.prefetch_limit),
                        models.Prefetch(query=sparse, using=SPARSE_VECTOR, filter=flt, limit=query.prefetch_limit,
                                        params=sparse_params),
                    ],
                    query=models.RrfQuery(rrf=models.Rrf(k=QDRANT_RRF_K)),
                    query_filter=flt, limit=limit, with_payload=True, with_vectors=False)
            if dense is not None:
                return cl.query_points(self._collection, query=dense, using=self._dense, query_filter=flt,
                                       limit=limit, with_payload=True, with_vectors=False)
            return cl.query_points(self._collection, query=sparse, using=SPARSE_VECTOR, query_filter=flt,
                                   search_params=sparse_params, limit=limit, with_payload=True, with_vectors=False)

        response = await self._call("search", run, deadline)
        return [hit for point in response.points
                if (hit := scored_chunk(where.tenant_id, point.payload, point.score)) is not None]

    async def count(self, where: ChunkFilter, deadline: Deadline) -> int:
        flt = to_qdrant_filter(where)
        result = await self._call("count", lambda cl: cl.count(self._collection, count_filter=flt, exact=True),
                                  deadline)
        return int(result.count)

    async def delete(self, where: ChunkFilter, deadline: Deadline) -> None:
        flt = to_qdrant_filter(where)
        await self._call("delete", lambda cl: cl.delete(
            self._collection, points_selector=models.FilterSelector(filter=flt), wait=True), deadline)
