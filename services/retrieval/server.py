"""Wire the retrieval service: embedder, Qdrant store, index, servicer, gRPC server."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from libs.deadlines import Deadline
from libs.errors import TollgateError
from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.embedding import HashingEmbedder
from services.retrieval.index import DocumentIndex
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.retrieval.store import QdrantVectorStore

log = logging.getLogger(__name__)

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def build_store(settings: RetrievalSettings) -> QdrantVectorStore:
    return QdrantVectorStore.create(url=settings.qdrant_url, api_key=settings.qdrant_api_key,
                                    path=settings.qdrant_path, collection=settings.collection,
                                    dim=settings.embedding_dim, call_timeout_s=settings.qdrant_timeout_s)


async def build(settings: RetrievalSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Bindings and an async close for the service; Qdrant being down does not stop it from starting."""
    store = build_store(settings)
    mode = "server" if settings.qdrant_url else ("embedded on disk" if settings.qdrant_path else "in memory")
    try:
        await store.start(Deadline.after(settings.qdrant_timeout_s))
        log.info("vector store ready (%s, collection %s)", mode, settings.collection)
    except TollgateError as exc:
        # Answer UNAVAILABLE per request and retry the setup on each, rather than crash-looping.
        log.warning("vector store not ready (%s): %s; will retry on the next request", mode, exc.reason)
    index = DocumentIndex(HashingEmbedder(settings.embedding_dim), store,
                          default_chunking=ChunkingOptions(settings.chunk_tokens, settings.overlap_tokens))
    servicer = RetrievalServicer(index, settings)

    def add(server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]

    return [ServiceBinding(SERVICE_NAME, add)], store.close


async def serve(settings: RetrievalSettings) -> None:
    async def _build() -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
        return await build(settings)

    await serve_until_stopped(settings, "retrieval", _build)


def main() -> None:
    settings = load_settings(RetrievalSettings)
    run(lambda: serve(settings), service="retrieval", log_level=settings.log_level)
