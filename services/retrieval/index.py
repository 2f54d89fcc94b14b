"""``DocumentIndex``: ingest, search and delete documents for one tenant at a time.

Tenant isolation is enforced here: every operation takes the caller's tenant
(from the authenticated request, never from document or filter data) and
every read or delete is scoped by a :class:`~services.retrieval.store.ChunkFilter`
whose tenant is a ``must`` condition. Caller metadata filters are a separate
field of that filter, matched only against the chunk's own metadata, so a
filter such as ``{"tenant_id": "other"}`` narrows the caller's own results
(to chunks whose *metadata* says so) and can never widen them.
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
from services.retrieval.embedding import Embedder
from services.retrieval.store import ChunkFilter, ChunkRecord, VectorStore

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

    def __init__(self, embedder: Embedder, store: VectorStore, *, default_chunking: ChunkingOptions) -> None:
        self._embedder = embedder
        self._store = store
        self._default_chunking = default_chunking

    @property
    def default_chunking(self) -> ChunkingOptions:
        return self._default_chunking

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
        for doc in documents:
            chunks = chunk_text(doc.text, options)
            counts[doc.document_id] = len(chunks)
            records.extend((doc, c.index, c.text) for c in chunks)

        vectors = await self._embed([text for _, _, text in records])
        if deadline.expired():
            raise DeadlineExceeded("deadline exceeded while embedding the documents")
        await self._store.upsert(tenant_id, [
            ChunkRecord(document_id=doc.document_id, chunk_index=index, text=text, metadata=dict(doc.metadata),
                        vector=vectors[row])
            for row, (doc, index, text) in enumerate(records)
        ], deadline)
        await self._store.delete_stale(tenant_id, counts, deadline)
        log.info("ingested tenant=%s documents=%d chunks=%d in %.1fms", tenant_id, len(documents), len(records),
                 (time.monotonic() - started) * 1000)
        return [IngestedDocument(doc.document_id, counts[doc.document_id]) for doc in documents]

    async def search(self, tenant_id: str, query: str, top_k: int,
                     metadata_filter: Mapping[str, str] | None = None,
                     deadline: Deadline | None = None) -> list[SearchHit]:
        """The ``top_k`` chunks of ``tenant_id`` most similar to ``query``, best first.

        ``metadata_filter`` requires exact metadata matches; it is combined with,
        and can never replace, the tenant condition.
        """
        _require_tenant(tenant_id)
        deadline = deadline or Deadline.after(_DEFAULT_DEADLINE_S)
        if top_k < 1:
            return []
        started = time.monotonic()
        vector = (await self._embed([query]))[0]
        if not np.any(vector):
            return []
        where = ChunkFilter(tenant_id=tenant_id, metadata=dict(metadata_filter or {}))
        found = await self._store.search(where, vector, top_k, deadline)
        hits = [SearchHit(chunk_id=h.chunk_id, document_id=h.document_id, text=h.text, score=h.score,
                          metadata=h.metadata) for h in found]
        log.info("search tenant=%s top_k=%d filters=%d hits=%d in %.1fms", tenant_id, top_k,
                 len(where.metadata), len(hits), (time.monotonic() - started) * 1000)
        return hits

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

    async def _embed(self, texts: list[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self._embedder.dim), dtype=np.float32)
        # CPU-bound; keep the event loop free for other requests.
        return await asyncio.to_thread(self._embedder.embed, texts)
