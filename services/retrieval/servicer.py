"""gRPC servicer of tollgate.retrieval.v1.RetrievalService: validate, translate, call the index."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import grpc
from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from libs.deadlines import Deadline
from libs.errors import Violations
from libs.validation import check_labels, check_name, check_no_nul
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import SearchMode

log = logging.getLogger(__name__)

MAX_TENANT_ID_CHARS = 128
MAX_DOCUMENT_ID_CHARS = 256
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
# A request with thousands of bad documents gets the first few violations, not a megabyte of them.
MAX_VIOLATIONS = 50

# UNSPECIFIED: the service's default mode (hybrid unless configured otherwise).
_MODES: dict[int, SearchMode | None] = {
    retrieval_pb2.SEARCH_MODE_UNSPECIFIED: None,
    retrieval_pb2.SEARCH_MODE_DENSE: SearchMode.DENSE,
    retrieval_pb2.SEARCH_MODE_SPARSE: SearchMode.SPARSE,
    retrieval_pb2.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
}
_MODE_TO_PB = {
    SearchMode.DENSE: retrieval_pb2.SEARCH_MODE_DENSE,
    SearchMode.SPARSE: retrieval_pb2.SEARCH_MODE_SPARSE,
    SearchMode.HYBRID: retrieval_pb2.SEARCH_MODE_HYBRID,
}


class _Violations(Violations):
    """Violations that stop collecting after ``MAX_VIOLATIONS``."""

    def add(self, field_path: str, description: str) -> None:
        if len(self.items) < MAX_VIOLATIONS:
            super().add(field_path, description)


def _check_tenant(v: Violations, tenant_id: str, path: str = "tenant_id") -> None:
    if not tenant_id.strip():
        v.add(path, "is required")
    else:
        check_name(v, tenant_id, path, max_chars=MAX_TENANT_ID_CHARS)


def _check_document_id(v: Violations, document_id: str, path: str) -> None:
    check_name(v, document_id, path, max_chars=MAX_DOCUMENT_ID_CHARS, required=True)


def _check_metadata(v: Violations, metadata: Mapping[str, str], path: str) -> None:
    check_labels(v, metadata, path, max_labels=MAX_METADATA_ENTRIES, max_key_chars=MAX_METADATA_KEY_CHARS,
                 max_value_chars=MAX_METADATA_VALUE_CHARS, text_values=True)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    def __init__(self, index: DocumentIndex, settings: RetrievalSettings) -> None:
        self._index = index
        self._settings = settings

    def _deadline(self, context: grpc.aio.ServicerContext, default_s: float | None = None) -> Deadline:
        return Deadline.from_remaining(context.time_remaining(),
                                       default_s=default_s or self._settings.request_timeout_s,
                                       max_s=self._settings.max_request_timeout_s)

    # -- validation --------------------------------------------------------------------------

    def _chunking(self, v: Violations, opts: retrieval_pb2.ChunkingOptions, path: str) -> ChunkingOptions | None:
        """Request chunking with defaults filled in (zero means default), or None when invalid."""
        default = self._index.default_chunking
        chunk = opts.chunk_tokens or default.chunk_tokens
        if chunk > self._settings.max_chunk_tokens:
            v.add(f"{path}.chunk_tokens", f"must be at most {self._settings.max_chunk_tokens}")
            return None
        if opts.overlap_tokens:
            overlap = opts.overlap_tokens
            if overlap >= chunk:
                v.add(f"{path}.overlap_tokens", f"must be smaller than chunk_tokens ({chunk})")
                return None
        else:
            # Default overlap, shrunk to a quarter window when the caller picked a small window.
            overlap = default.overlap_tokens if default.overlap_tokens < chunk else chunk // 4
        return ChunkingOptions(chunk_tokens=chunk, overlap_tokens=overlap)

    def _ingest_request(self, request: retrieval_pb2.IngestRequest,
                        prefix: str = "") -> tuple[str, list[Document], ChunkingOptions | None, Violations]:
        v = _Violations()
        _check_tenant(v, request.tenant_id, f"{prefix}tenant_id")
        docs_path = f"{prefix}documents"
        if not request.documents:
            v.add(docs_path, "must not be empty")
        elif len(request.documents) > self._settings.max_documents_per_request:
            v.add(docs_path, f"must have at most {self._settings.max_documents_per_request} documents")
        seen: set[str] = set()
        documents: list[Document] = []
        for i, doc in enumerate(request.documents[: self._settings.max_documents_per_request]):
            path = f"{docs_path}[{i}]"
            _check_document_id(v, doc.document_id, f"{path}.document_id")
            if doc.document_id and doc.document_id in seen:
                v.add(f"{path}.document_id", "is duplicated in the request")
            seen.add(doc.document_id)
            if not doc.text.strip():
                v.add(f"{path}.text", "must not be empty")
            elif len(doc.text.encode("utf-8")) > self._settings.max_document_bytes:
                v.add(f"{path}.text", f"must be at most {self._settings.max_document_bytes} bytes")
            else:
                check_no_nul(v, doc.text, f"{path}.text")
            _check_metadata(v, doc.metadata, f"{path}.metadata")
            documents.append(Document(document_id=doc.document_id, text=doc.text, metadata=dict(doc.metadata)))
        chunking = self._chunking(v, request.chunking, f"{prefix}chunking")
        return request.tenant_id, documents, chunking, v

    # -- RPCs --------------------------------------------------------------------------------

    async def Ingest(self, request: retrieval_pb2.IngestRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.IngestResponse:
        tenant_id, documents, chunking, v = self._ingest_request(request)
        v.raise_if_any()
        ingested = await self._index.ingest(tenant_id, documents, chunking, self._deadline(context))
        return retrieval_pb2.IngestResponse(documents=[
            retrieval_pb2.IngestedDocument(document_id=d.document_id, chunk_count=d.chunk_count) for d in ingested
        ])

    async def IngestStream(self, request_iterator: AsyncIterator[retrieval_pb2.IngestStreamRequest],
                           context: grpc.aio.ServicerContext) -> retrieval_pb2.IngestStreamResponse:
        """Ingest batch by batch as they arrive (bounded memory).

        Every batch must name the same tenant. A bad batch fails the stream, but
        batches before it stay ingested; ingestion is idempotent, so the client
        can simply resend the whole stream. The deadline covers the whole stream
        (when the caller sets none, the service maximum applies, not the unary default).
        """
        deadline = self._deadline(context, default_s=self._settings.max_request_timeout_s)
        tenant: str | None = None
        total_documents = total_chunks = batches = 0
        async for message in request_iterator:
            tenant_id, documents, chunking, v = self._ingest_request(message.batch, prefix="batch.")
            if tenant is not None and tenant_id != tenant:
                v.add("batch.tenant_id", f"must be the same in every batch of a stream (batch {batches})")
            v.raise_if_any()
            tenant = tenant_id
            ingested = await self._index.ingest(tenant_id, documents, chunking, deadline)
            batches += 1
            total_documents += len(ingested)
            total_chunks += sum(d.chunk_count for d in ingested)
        log.info("ingest stream tenant=%s batches=%d documents=%d chunks=%d", tenant, batches, total_documents,
                 total_chunks)
        return retrieval_pb2.IngestStreamResponse(documents=total_documents, chunks=total_chunks)

    async def Search(self, request: retrieval_pb2.SearchRequest,
                     context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        v = _Violations()
        _check_tenant(v, request.tenant_id)
        if not request.query.strip():
            v.add("query", "must not be empty")
        elif len(request.query) > self._settings.max_query_chars:
            v.add("query", f"must be at most {self._settings.max_query_chars} characters")
        else:
            check_no_nul(v, request.query, "query")
        if not 1 <= request.top_k <= self._settings.max_top_k:
            v.add("top_k", f"must be between 1 and {self._settings.max_top_k}")
        if request.mode not in _MODES:
            v.add("mode", "is not a known search mode")
        _check_metadata(v, request.metadata_filter, "metadata_filter")
        v.raise_if_any()
        mode = _MODES[request.mode] or self._index.default_mode
        hits = await self._index.search(request.tenant_id, request.query, request.top_k,
                                        dict(request.metadata_filter), self._deadline(context), mode=mode)
        return retrieval_pb2.SearchResponse(hits=[
            retrieval_pb2.SearchHit(chunk_id=h.chunk_id, document_id=h.document_id, text=h.text, score=h.score,
                                    metadata=h.metadata)
            for h in hits
        ], mode=_MODE_TO_PB[mode])

    async def DeleteDocuments(self, request: retrieval_pb2.DeleteDocumentsRequest,
                              context: grpc.aio.ServicerContext) -> retrieval_pb2.DeleteDocumentsResponse:
        v = _Violations()
        _check_tenant(v, request.tenant_id)
        if not request.document_ids:
            v.add("document_ids", "must not be empty")
        elif len(request.document_ids) > self._settings.max_documents_per_request:
            v.add("document_ids", f"must have at most {self._settings.max_documents_per_request} ids")
        for i, document_id in enumerate(request.document_ids[: self._settings.max_documents_per_request]):
            _check_document_id(v, document_id, f"document_ids[{i}]")
        v.raise_if_any()
        deleted = await self._index.delete(request.tenant_id, list(request.document_ids), self._deadline(context))
        return retrieval_pb2.DeleteDocumentsResponse(deleted_chunks=deleted)
