"""``DocumentIndex``: ingest, search and delete documents for one tenant at a time.

Tenant isolation is enforced here: every operation takes the caller's tenant
(from the authenticated request, never from document or filter data) and
every read or delete is scoped by a :class:`~services.retrieval.store.ChunkFilter`
whose tenant is a ``must`` condition. Caller metadata filters are a separate
field of that filter, matched only against the chunk's own metadata, so a
filter such as ``{"tenant_id": "other"}`` narrows the caller's own results
(to chunks whose *metadata* says so) and can never widen them.

Search modes: ``dense`` (the embedder's vectors), ``sparse`` (BM25) and
``hybrid`` (both, fused by Reciprocal Rank Fusion with k = 60 in the store),
optionally followed by a reranker (:mod:`services.retrieval.rerank`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FieldViolation, InvalidArgument
from services.retrieval.chunking import ChunkingOptions, chunk_text
from services.retrieval.embedding import ChunkEmbedder
from services.retrieval.rerank import Reranker, apply_rerank
from services.retrieval.sparse import SparseEncoder, SparseVector
from services.retrieval.store import ChunkFilter, ChunkRecord, SearchMode, StoreQuery, VectorStore

log = logging.getLogger(__name__)

# Used when a caller passes no deadline (tests, scripts); the servicer always passes one.
_DEFAULT_DEADLINE_S = 30.0


@dataclass(frozen=True)
class Document:
    document_id: str
    text: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestedDocument:
    document_id: str
    chunk_count: int


@dataclass(frozen=True)
class SearchHit:
    chunk_id: str
    document_id: str
    text: str
    score: float
    metadata: dict[str, str]


def _require_tenant(tenant_id: str) -> None:
    if not tenant_id:
        raise InvalidArgument([FieldViolation("tenant_id", "is required")])


class DocumentIndex:
    """Chunk, embed and store documents; search and delete them, always within one tenant."""

    def __init__(self, embedder: ChunkEmbedder, store: VectorStore, *, default_chunking: ChunkingOptions,
                 sparse: SparseEncoder | None = None, reranker: Reranker | None = None,
                 default_mode: SearchMode = SearchMode.HYBRID, prefetch_limit: int = 100) -> None:
        """``sparse`` None disables BM25 (sparse and hybrid searches then use the dense retriever alone)."""
        self._embedder = embedder
        self._store = store
        self._default_chunking = default_chunking
        self._sparse = sparse
        self._reranker = reranker
        self._default_mode = default_mode
        self._prefetch_limit = prefetch_limit

    @property
    def default_chunking(self) -> ChunkingOptions:
        return self._default_chunking

    @property
    def default_mode(self) -> SearchMode:
        return self._default_mode

    async def ingest(self, tenant_id: str, documents: Sequence[Document], chunking: ChunkingOptions | None = None,
                     deadline: Deadline | None = None) -> list[IngestedDocument]:
        """Index ``documents`` for ``tenant_id``; returns each document's chunk count, in request order.

        Idempotent: chunk ids are derived from (tenant, document, chunk index), so
        re-ingesting overwrites in place, and chunks beyond the new version's
        length are deleted afterwards, so a shorter new version leaves nothing
        stale. (New chunks are written before the old tail is removed, so readers
        never see the document missing while it is being replaced.)
        """
        _require_tenant(tenant_id)
        deadline = deadline or Deadline.after(_DEFAULT_DEADLINE_S)
        options = chunking or self._default_chunking
        seen: set[str] = set()
        for i, doc in enumerate(documents):
            if doc.document_id in seen:
                raise InvalidArgument([FieldViolation(f"documents[{i}].document_id", "is duplicated in the request")])
            seen.add(doc.document_id)
        if not documents:
            return []
        started = time.monotonic()

        records: list[tuple[Document, int, str]] = []
        counts: dict[str, int] = {}
        texts = [doc.text for doc in documents]
        for doc, chunks in zip(documents, await asyncio.to_thread(self._chunk_all, texts, options), strict=True):
            counts[doc.document_id] = len(chunks)
            records.extend((doc, index, text) for index, text in enumerate(chunks))

        vectors, sparse = await asyncio.to_thread(self._encode_documents, [text for _, _, text in records])
        if deadline.expired():
            raise DeadlineExceeded("deadline exceeded while embedding the documents")
        await self._store.upsert(tenant_id, [
            ChunkRecord(document_id=doc.document_id, chunk_index=index, text=text, metadata=dict(doc.metadata),
                        vector=vectors[row], sparse=sparse[row])
            for row, (doc, index, text) in enumerate(records)
        ], deadline)
        await self._store.delete_stale(tenant_id, counts, deadline)
        log.info("ingested tenant=%s documents=%d chunks=%d in %.1fms", tenant_id, len(documents), len(records),
                 (time.monotonic() - started) * 1000)
        return [IngestedDocument(doc.document_id, counts[doc.document_id]) for doc in documents]

    async def search(self, tenant_id: str, query: str, top_k: int,
                     metadata_filter: Mapping[str, str] | None = None,
                     deadline: Deadline | None = None, mode: SearchMode | None = None) -> list[SearchHit]:
        """The ``top_k`` chunks of ``tenant_id`` most relevant to ``query``, best first.

        ``metadata_filter`` requires exact metadata matches; it is combined with,
        and can never replace, the tenant condition. ``mode`` None is the
        index's default (hybrid). Scores are cosine similarities (dense), BM25
        scores (sparse) or RRF scores (hybrid), or the reranker's.
        """
        _require_tenant(tenant_id)
        deadline = deadline or Deadline.after(_DEFAULT_DEADLINE_S)
        if top_k < 1:
            return []
        started = time.monotonic()
        mode = mode or self._default_mode
        store_query = await asyncio.to_thread(self._encode_query, query, mode)
        if store_query is None:
            return []
        where = ChunkFilter(tenant_id=tenant_id, metadata=dict(metadata_filter or {}))
        limit = max(top_k, self._reranker.candidates) if self._reranker is not None else top_k
        found = await self._store.search(where, store_query, limit, deadline)
        hits = [SearchHit(chunk_id=h.chunk_id, document_id=h.document_id, text=h.text, score=h.score,
                          metadata=h.metadata) for h in found]
        if self._reranker is not None and hits:
            hits = await self._rerank(query, hits, top_k, deadline)
        log.info("search tenant=%s mode=%s top_k=%d filters=%d hits=%d in %.1fms", tenant_id, mode.value, top_k,
                 len(where.metadata), len(hits), (time.monotonic() - started) * 1000)
        return hits[:top_k]

    async def _rerank(self, query: str, hits: list[SearchHit], top_k: int, deadline: Deadline) -> list[SearchHit]:
        assert self._reranker is not None
        reranker = self._reranker
        order = await asyncio.to_thread(reranker.rerank, query, [h.text for h in hits])
        if deadline.expired():
            raise DeadlineExceeded("deadline exceeded while reranking")
        return [SearchHit(chunk_id=h.chunk_id, document_id=h.document_id, text=h.text, score=score,
                          metadata=h.metadata) for h, score in apply_rerank(order, hits, top_k)]

    def _encode_query(self, query: str, mode: SearchMode) -> StoreQuery | None:
        """The store query for ``mode``; None when nothing can match (no words, or no indexed terms in sparse mode)."""
        use_sparse = mode in (SearchMode.SPARSE, SearchMode.HYBRID) and self._sparse is not None
        use_dense = mode in (SearchMode.DENSE, SearchMode.HYBRID) or not use_sparse
        sparse = self._sparse.embed_query(query) if use_sparse and self._sparse is not None else None
        dense: npt.NDArray[np.float32] | None = None
        if use_dense:
            vector = self._embedder.embed([query])[0]
            dense = vector if np.any(vector) else None
        if dense is None and not sparse:
            return None
        # A query made only of stop words has no BM25 terms: hybrid is then its dense half alone.
        return StoreQuery(dense=dense, sparse=sparse or None, prefetch_limit=self._prefetch_limit)

    async def delete(self, tenant_id: str, document_ids: Sequence[str], deadline: Deadline | None = None) -> int:
        """Delete the tenant's chunks of ``document_ids``; returns how many chunks were deleted.

        Unknown document ids are not an error (deleting is idempotent). The count
        is taken just before the delete, so a concurrent ingest of the same
        documents can make it approximate.
        """
        _require_tenant(tenant_id)
        deadline = deadline or Deadline.after(_DEFAULT_DEADLINE_S)
        if not document_ids:
            return 0
        where = ChunkFilter(tenant_id=tenant_id, document_ids=tuple(dict.fromkeys(document_ids)))
        count = await self._store.count(where, deadline)
        if count:
            await self._store.delete(where, deadline)
        log.info("deleted tenant=%s documents=%d chunks=%d", tenant_id, len(where.document_ids or ()), count)
        return count

    # CPU-bound steps below run in worker threads, keeping the event loop free for other requests.

    def _chunk_all(self, texts: list[str], options: ChunkingOptions) -> list[list[str]]:
        counter = self._embedder.count_tokens
        return [[c.text for c in chunk_text(text, options, counter)] for text in texts]

    def _encode_documents(self, texts: list[str]) -> tuple[npt.NDArray[np.float32], list[SparseVector]]:
        if not texts:
            return np.zeros((0, self._embedder.dim), dtype=np.float32), []
        dense = self._embedder.embed(texts)
        sparse = self._sparse.embed_documents(texts) if self._sparse is not None else [SparseVector((), ())] * len(
            texts)
        return dense, sparse
