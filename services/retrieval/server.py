"""Wire the retrieval service: embedder, BM25 encoder, vector store, index, servicer, gRPC server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from libs import static_model as model_setup
from libs.deadlines import Deadline
from libs.errors import TollgateError
from libs.grpc_server import ServiceBinding, run, serve_until_stopped
from libs.settings import load_settings
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.edge_store import EdgeVectorStore
from services.retrieval.embedding import ChunkEmbedder, HashingEmbedder
from services.retrieval.index import DocumentIndex
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import RetrievalSettings
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store import QdrantVectorStore, SearchMode, VectorStore

log = logging.getLogger(__name__)

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def build_embedder(settings: RetrievalSettings) -> ChunkEmbedder:
    """The configured dense embedder, from files on disk only; a missing model stops the service with a message."""
    if settings.embedder == "hashing":
        return HashingEmbedder(settings.embedding_dim)
    if settings.embedder == "minilm":
        from services.retrieval.embedding import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(name="minilm-l6-v2-384")
    from services.retrieval.embedding import Model2VecEmbedder

    folder = Path(settings.model_dir) if settings.model_dir else model_setup.DEFAULT_DIR
    if not model_setup.is_prepared(folder):
        raise SystemExit(f"retrieval: the embedding model is not prepared in {folder}; run `make setup` "
                         "(python -m libs.static_model), or set TOLLGATE_RETRIEVAL_EMBEDDER=hashing")
    return Model2VecEmbedder(folder, name=folder.name)


def build_store(settings: RetrievalSettings, embedder: ChunkEmbedder) -> VectorStore:
    # The dense vector is named after the embedder, so a collection never mixes two vector spaces.
    dense = f"dense-{embedder.name}"
    if settings.qdrant_url or settings.embedded_engine == "local":
        return QdrantVectorStore.create(url=settings.qdrant_url, api_key=settings.qdrant_api_key,
                                        path=settings.qdrant_path, collection=settings.collection,
                                        dim=embedder.dim, call_timeout_s=settings.qdrant_timeout_s,
                                        dense_vector=dense)
    return EdgeVectorStore(settings.edge_path, dim=embedder.dim,
                           call_timeout_s=settings.qdrant_timeout_s, dense_vector=dense)


async def build(settings: RetrievalSettings) -> tuple[Sequence[ServiceBinding], Callable[[], Awaitable[None]]]:
    """Bindings and an async close for the service; Qdrant being down does not stop it from starting."""
    embedder = await asyncio.to_thread(build_embedder, settings)
    store = build_store(settings, embedder)
    if settings.qdrant_url:
        mode = "server"
    else:
        where = "on disk" if settings.data_dir else "in memory"
        mode = f"embedded {settings.embedded_engine} {where}"
    try:
        await store.start(Deadline.after(settings.qdrant_timeout_s))
        log.info("vector store ready (%s, collection %s)", mode, settings.collection)
    except TollgateError as exc:
        # Answer UNAVAILABLE per request and retry the setup on each, rather than crash-looping.
        log.warning("vector store not ready (%s): %s; will retry on the next request", mode, exc.reason)
    index = DocumentIndex(embedder, store,
                          default_chunking=ChunkingOptions(settings.chunk_tokens, settings.overlap_tokens),
                          sparse=Bm25Encoder(k=settings.bm25_k, b=settings.bm25_b, avg_len=settings.bm25_avg_len),
                          default_mode=SearchMode(settings.default_search_mode),
                          prefetch_limit=settings.prefetch_limit)
    log.info("embedder %s (dim %d), default search mode %s", embedder.name, embedder.dim,
             settings.default_search_mode)
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
