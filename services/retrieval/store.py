"""Vector storage of document chunks: ``VectorStore`` protocol and the Qdrant implementation.

Every read and delete goes through a :class:`ChunkFilter`, whose ``tenant_id``
is mandatory and always becomes a ``must`` condition; caller metadata is
matched only against the ``metadata_kv`` payload field, so no metadata key can
reach the real ``tenant_id`` (or any other system) field.

Payload of a point::

    tenant_id, document_id, chunk_id, chunk_index, text,
    metadata      {key: value}           returned with hits
    metadata_kv   ['["key", "value"]']   what metadata filters match (any key, even "a.b" or "tenant_id")

Point ids are ``uuid5(tenant, document, chunk_index)``, so writing the same
chunk twice overwrites it instead of duplicating it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from qdrant_client import QdrantClient, models

from libs.deadlines import Deadline
from libs.errors import FailedPrecondition, TollgateError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DENSE_VECTOR = "dense"
_POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://tollgate.dev/retrieval/chunk")
# Margin left for the answer to travel back once a backend call returns.
_HOP_MARGIN_S = 0.05
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

    async def search(self, where: ChunkFilter, vector: npt.NDArray[np.float32], limit: int,
                     deadline: Deadline) -> list[ScoredChunk]: ...

    async def count(self, where: ChunkFilter, deadline: Deadline) -> int: ...

    async def delete(self, where: ChunkFilter, deadline: Deadline) -> None: ...


def _match(key: str, value: str | int) -> models.FieldCondition:
    return models.FieldCondition(key=key, match=models.MatchValue(value=value))


def to_qdrant_filter(where: ChunkFilter) -> models.Filter:
    """The Qdrant filter for ``where``; the tenant condition comes first and is always present."""
    must: list[models.Condition] = [_match("tenant_id", where.tenant_id)]
    if where.document_ids is not None:
        must.append(models.FieldCondition(key="document_id", match=models.MatchAny(any=list(where.document_ids))))
    for key, value in sorted(where.metadata.items()):
        must.append(_match("metadata_kv", metadata_term(key, value)))
    return models.Filter(must=must)


class QdrantVectorStore:
    """:class:`VectorStore` on qdrant-client: a Qdrant server, or embedded (local mode) on disk or in memory.

    qdrant-client is synchronous, so each call runs in a worker thread, bounded
    by ``call_timeout_s`` and the request deadline (a late answer is abandoned and
    reported as ``Unavailable``/``BACKEND_TIMEOUT``). Local mode is single-process
    and not meant for concurrent use, so its calls are serialised by a lock.
    The client and collection are set up lazily and retried on the next call
    after a failure, so the service starts (and answers UNAVAILABLE) while
    Qdrant is down.
    """

    def __init__(self, client_factory: Callable[[], QdrantClient], *, collection: str, dim: int,
                 local: bool, call_timeout_s: float = 5.0) -> None:
        self._client_factory = client_factory
        self._collection = collection
        self._dim = dim
        self._local = local
        self._call_timeout_s = call_timeout_s
        self._client: QdrantClient | None = None
        # Opening a client may outlast one request (an embedded store loads every point from disk),
        # so it runs as its own task that later requests wait on, never abandoned half-way.
        self._connecting: asyncio.Future[QdrantClient] | None = None
        self._ready = False
        self._setup_lock = asyncio.Lock()
        # Held inside the worker thread, so an abandoned (timed out) call still excludes the next one.
        self._thread_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if local else contextlib.nullcontext())

    @classmethod
    def create(cls, *, url: str, api_key: str, path: Path | None, collection: str, dim: int,
               call_timeout_s: float) -> QdrantVectorStore:
        """A server client when ``url`` is set, else embedded at ``path`` (in memory when None)."""
        if url:
            def factory() -> QdrantClient:
                # No version probe at construction: it would block start-up while the server is down.
                return QdrantClient(url=url, api_key=api_key or None, timeout=max(1, int(call_timeout_s + 0.999)),
                                    check_compatibility=False)
            return cls(factory, collection=collection, dim=dim, local=False, call_timeout_s=call_timeout_s)

        def local_factory() -> QdrantClient:
            if path is None:
                return QdrantClient(location=":memory:", force_disable_check_same_thread=True)
            path.mkdir(parents=True, exist_ok=True)
            return QdrantClient(path=str(path), force_disable_check_same_thread=True)

        return cls(local_factory, collection=collection, dim=dim, local=True, call_timeout_s=call_timeout_s)

    @property
    def is_local(self) -> bool:
        return self._local

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, deadline: Deadline) -> None:
        await self._ensure_ready(deadline)

    async def close(self) -> None:
        async with self._setup_lock:
            client, self._client, self._ready = self._client, None, False
            connecting, self._connecting = self._connecting, None
        if client is None and connecting is not None:
            with contextlib.suppress(Exception):
                client = await asyncio.wait_for(asyncio.shield(connecting), self._call_timeout_s)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(self._locked, client.close), self._call_timeout_s)

    async def _connect(self, deadline: Deadline) -> QdrantClient:
        if self._connecting is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._locked, self._client_factory))
            # Mark a failure seen even if no request is waiting any more when it happens.
            task.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connecting = task
        timeout = deadline.hop_timeout(_HOP_MARGIN_S, cap_s=self._call_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
        except TimeoutError:
            log.warning("qdrant connect still running after %.2fs", timeout)
            raise Unavailable("vector store is still starting", reason="BACKEND_TIMEOUT", retry_after_s=1.0) from None
        except Exception as exc:
            self._connecting = None  # try afresh on the next request
            log.warning("qdrant connect failed: %s: %.200s", type(exc).__name__, exc)
            raise Unavailable("vector store cannot be opened", reason="BACKEND_ERROR", retry_after_s=1.0) from None

    async def _ensure_ready(self, deadline: Deadline) -> QdrantClient:
        if self._ready and self._client is not None:
            return self._client
        async with self._setup_lock:
            if self._client is None:
                self._client = await self._connect(deadline)
                self._connecting = None
            client = self._client
            if not self._ready:
                await self._run("ensure_collection", lambda: self._ensure_collection(client), deadline)
                self._ready = True
            return client

    def _ensure_collection(self, client: QdrantClient) -> None:
        if not client.collection_exists(self._collection):
            try:
                client.create_collection(
                    self._collection,
                    vectors_config={DENSE_VECTOR: models.VectorParams(size=self._dim, distance=models.Distance.COSINE)},
                )
                log.info("created collection %s (dim %d)", self._collection, self._dim)
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
        vectors = client.get_collection(self._collection).config.params.vectors
        params = vectors.get(DENSE_VECTOR) if isinstance(vectors, dict) else None
        if params is None or params.size != self._dim or params.distance != models.Distance.COSINE:
            raise FailedPrecondition(
                f"collection {self._collection!r} does not have a {self._dim}-dim cosine vector {DENSE_VECTOR!r}; "
                "use another collection name or re-create it",
                reason="COLLECTION_MISMATCH",
            )

    # -- calls -------------------------------------------------------------------------------

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._thread_lock:
            return fn()

    async def _run(self, op: str, fn: Callable[[], T], deadline: Deadline) -> T:
        timeout = deadline.hop_timeout(_HOP_MARGIN_S, cap_s=self._call_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._locked, fn), timeout)
        except TimeoutError:
            log.warning("qdrant %s timed out after %.2fs", op, timeout)
            self._ready = False
            raise Unavailable(f"vector store did not answer {op} in time", reason="BACKEND_TIMEOUT",
                              retry_after_s=1.0) from None
        except TollgateError:
            raise
        except Exception as exc:
            # Type and a bounded message only: backend errors never carry document text, but stay safe.
            log.warning("qdrant %s failed: %s: %.200s", op, type(exc).__name__, exc)
            self._ready = False
            raise Unavailable(f"vector store failed during {op}", reason="BACKEND_ERROR", retry_after_s=1.0) from None

    async def _call(self, op: str, fn: Callable[[QdrantClient], T], deadline: Deadline) -> T:
        client = await self._ensure_ready(deadline)
        return await self._run(op, lambda: fn(client), deadline)

    # -- VectorStore -------------------------------------------------------------------------

    async def upsert(self, tenant_id: str, chunks: Sequence[ChunkRecord], deadline: Deadline) -> None:
        if not tenant_id:
            raise ValueError("upsert needs a tenant")
        points = [
            models.PointStruct(
                id=point_id(tenant_id, c.document_id, c.chunk_index),
                vector={DENSE_VECTOR: c.vector.astype(np.float32).tolist()},
                payload={
                    "tenant_id": tenant_id,
                    "document_id": c.document_id,
                    "chunk_id": chunk_id(c.document_id, c.chunk_index),
                    "chunk_index": c.chunk_index,
                    "text": c.text,
                    "metadata": dict(c.metadata),
                    "metadata_kv": [metadata_term(k, v) for k, v in sorted(c.metadata.items())],
                },
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

    async def search(self, where: ChunkFilter, vector: npt.NDArray[np.float32], limit: int,
                     deadline: Deadline) -> list[ScoredChunk]:
        query = vector.astype(np.float32).tolist()
        flt = to_qdrant_filter(where)
        response = await self._call("search", lambda cl: cl.query_points(
            self._collection, query=query, using=DENSE_VECTOR, query_filter=flt, limit=limit,
            with_payload=True, with_vectors=False), deadline)
        hits: list[ScoredChunk] = []
        for point in response.points:
            payload = point.payload or {}
            # Belt and braces: the filter already guarantees this.
            if payload.get("tenant_id") != where.tenant_id:
                continue
            metadata = payload.get("metadata") or {}
            hits.append(ScoredChunk(
                chunk_id=str(payload.get("chunk_id", "")),
                document_id=str(payload.get("document_id", "")),
                chunk_index=int(payload.get("chunk_index", 0)),
                text=str(payload.get("text", "")),
                score=float(point.score),
                metadata={str(k): str(v) for k, v in metadata.items()},
            ))
        return hits

    async def count(self, where: ChunkFilter, deadline: Deadline) -> int:
        flt = to_qdrant_filter(where)
        result = await self._call("count", lambda cl: cl.count(self._collection, count_filter=flt, exact=True),
                                  deadline)
        return int(result.count)

    async def delete(self, where: ChunkFilter, deadline: Deadline) -> None:
        flt = to_qdrant_filter(where)
        await self._call("delete", lambda cl: cl.delete(
            self._collection, points_selector=models.FilterSelector(filter=flt), wait=True), deadline)
