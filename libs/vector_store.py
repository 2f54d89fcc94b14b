"""The one vector-store abstraction of the mesh: points with a dense (and optionally a sparse) vector and a
payload, searched under payload filters, in Qdrant's engine in process (``qdrant-edge-py``).

The cache's semantic tier and retrieval each keep their own domain store (what a point means, which
fields every search must filter on); both sit on what is here:

- the backend-neutral payload filter (:class:`Match`, :class:`MatchAny`, :class:`Range`, :class:`Filter`),
  so a service states its conditions once and no service touches engine types to filter;
- :class:`PointStore`, the blocking point-level protocol (upsert, search, count, delete, the ids lowest in a
  numeric field, optimize, close);
- :class:`EdgePointStore`, that protocol on one embedded shard: opened from a folder (created when empty,
  loaded otherwise; a temporary folder removed on close when there is none), payload indexes made
  idempotently, a shard made with other vectors refused as ``FailedPrecondition``/``COLLECTION_MISMATCH``,
  dense, sparse (IDF) or hybrid (RRF) search, and a lock that keeps an index build from racing the close;
- :class:`BlockingStore`, the call discipline for a blocking client used from asyncio: each call in a worker
  thread, bounded by a per-call timeout and the request deadline, lazy (re)connection, backend faults as
  ``Unavailable``.

A shard is opened by one process at a time (its write-ahead log is locked); the engine is thread-safe,
so calls need no lock of their own.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

from libs.deadlines import Deadline
from libs.errors import FailedPrecondition, TollgateError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")

# Margin left for the answer to travel back once a backend call returns.
HOP_MARGIN_S = 0.05


# -- payload filters --------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """The payload field ``key`` equals ``value`` (for a list field: contains it)."""

    key: str
    value: str | int


@dataclass(frozen=True)
class MatchAny:
    """The payload field ``key`` equals one of ``values``."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Range:
    """The numeric payload field ``key`` lies in the given bounds (None: unbounded on that side)."""

    key: str
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    def __post_init__(self) -> None:
        if self.gt is None and self.gte is None and self.lt is None and self.lte is None:
            raise ValueError(f"a range on {self.key!r} needs a bound")


@dataclass(frozen=True)
class Filter:
    """Every ``must`` condition holds and, when ``should`` is not empty, at least one ``should`` does."""

    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()


Condition = Match | MatchAny | Range | Filter


def _edge_condition(cond: Condition) -> Any:
    if isinstance(cond, Match):
        return qe.FieldCondition(cond.key, match=qe.MatchValue(cond.value))
    if isinstance(cond, MatchAny):
        return qe.FieldCondition(cond.key, match=qe.MatchAny(list(cond.values)))
    if isinstance(cond, Range):
        return qe.FieldCondition(cond.key, range=qe.RangeFloat(gt=cond.gt, gte=cond.gte, lt=cond.lt, lte=cond.lte))
    return to_edge_filter(cond)


def to_edge_filter(flt: Filter) -> qe.Filter:
    """The engine filter for ``flt`` (conditions in the order given)."""
    return qe.Filter(must=[_edge_condition(c) for c in flt.must],
                     should=[_edge_condition(c) for c in flt.should] or None)


# -- points, searches, shard layout -----------------------------------------------------------


class SparseValues(Protocol):
    """A sparse vector: term ids and their weights, one weight per id."""

    @property
    def indices(self) -> Sequence[int]: ...

    @property
    def values(self) -> Sequence[float]: ...


@dataclass(frozen=True)
class Point:
    id: str  # a UUID or an unsigned integer, as text
    vector: npt.NDArray[np.floating[Any]]  # the dense vector
    payload: Mapping[str, Any]
    sparse: SparseValues | None = None  # only for a store with a sparse vector


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity (dense), sparse dot product or RRF score (hybrid)
    payload: Mapping[str, Any]


@dataclass(frozen=True)
class SearchRequest:
    """A dense search, a sparse one, or both fused by Reciprocal Rank Fusion (``rrf_k``).

    ``filter`` restricts every stage; ``idf_corpus`` the points a sparse search computes IDF over
    (None: the whole shard); ``prefetch_limit`` is how many candidates each retriever hands to the fusion.
    """

    limit: int
    filter: Filter | None = None
    dense: npt.NDArray[np.floating[Any]] | None = None
    sparse: SparseValues | None = None
    prefetch_limit: int = 100
    rrf_k: int | None = None
    idf_corpus: Filter | None = None
    score_threshold: float | None = None
    hnsw_ef: int | None = None
    with_payload: bool = True

    def __post_init__(self) -> None:
        if self.dense is None and self.sparse is None:
            raise ValueError("a search needs a dense or a sparse vector")
        if self.dense is not None and self.sparse is not None and self.rrf_k is None:
            raise ValueError("a hybrid search needs rrf_k")


class IndexKind(enum.Enum):
    KEYWORD = "keyword"
    TENANT = "tenant"  # a keyword that partitions the points (Qdrant's is_tenant): tenant-filtered search stays cheap
    INTEGER = "integer"
    FLOAT = "float"


def _edge_index_schema(kind: IndexKind) -> Any:
    if kind is IndexKind.TENANT:
        return qe.KeywordIndexParams(is_tenant=True)
    return {IndexKind.KEYWORD: qe.PayloadSchemaType.Keyword, IndexKind.INTEGER: qe.PayloadSchemaType.Integer,
            IndexKind.FLOAT: qe.PayloadSchemaType.Float}[kind]


@dataclass(frozen=True)
class HnswSettings:
    m: int = 16
    ef_construct: int = 100
    # Below this many points a search scans instead of walking the graph, and no graph is built.
    indexing_threshold: int = 10_000
    max_indexing_threads: int = 1


@dataclass(frozen=True)
class ShardConfig:
    """What a shard holds: one cosine dense vector (unnamed when ``dense_vector`` is None), optionally one
    sparse vector with the IDF modifier, and indexed payload fields. ``hnsw``/``max_search_threads`` None:
    the engine's defaults."""

    dim: int
    dense_vector: str | None = None
    sparse_vector: str | None = None
    indexes: Mapping[str, IndexKind] = field(default_factory=dict)
    hnsw: HnswSettings | None = None
    max_search_threads: int | None = None

    def describe(self) -> str:
        dense = f"a {self.dim}-dim cosine vector" + (f" {self.dense_vector!r}" if self.dense_vector else "")
        sparse = f" and a {self.sparse_vector!r} sparse vector with IDF" if self.sparse_vector else ""
        return dense + sparse

    def to_edge(self) -> qe.EdgeConfig:
        params = qe.EdgeVectorParams(size=self.dim, distance=qe.Distance.Cosine)
        hnsw = self.hnsw
        return qe.EdgeConfig(
            vectors={self.dense_vector: params} if self.dense_vector else params,
            sparse_vectors={self.sparse_vector: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}
            if self.sparse_vector else None,
            hnsw_config=qe.HnswIndexConfig(m=hnsw.m, ef_construct=hnsw.ef_construct,
                                           full_scan_threshold=hnsw.indexing_threshold,
                                           max_indexing_threads=hnsw.max_indexing_threads) if hnsw else None,
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=hnsw.indexing_threshold) if hnsw else None,
            max_search_threads=self.max_search_threads,
        )


class PointStore(Protocol):
    """Points under payload filters; every call blocks (run it inline when it is short, in a thread if not)."""

    def upsert(self, points: Sequence[Point]) -> None: ...

    def search(self, request: SearchRequest) -> list[Hit]:
        """The best points first."""
        ...

    def count(self, flt: Filter | None = None) -> int: ...

    def delete(self, flt: Filter) -> None: ...

    def delete_ids(self, point_ids: Sequence[str]) -> None: ...

    def lowest(self, key: str, limit: int) -> list[str]:
        """The ids of the ``limit`` points with the lowest value of the numeric payload field ``key`` (indexed)."""
        ...

    def optimize(self) -> None:
        """Build the search index of what was written since the last time, vacuum deleted points and release
        what that replaced (may take seconds)."""
        ...

    def close(self) -> None:
        """Flush and close; idempotent."""
        ...


# -- the embedded engine ----------------------------------------------------------------------


def _edge_sparse(vec: SparseValues) -> qe.SparseVector:
    return qe.SparseVector(list(vec.indices), list(vec.values))


def _as_list(vec: npt.NDArray[np.floating[Any]]) -> list[float]:
    out: list[float] = np.asarray(vec, dtype=np.float32).tolist()
    return out


class EdgePointStore:
    """:class:`PointStore` on one Qdrant Edge shard in ``path`` (in a temporary folder when None)."""

    def __init__(self, shard: qe.EdgeShard, config: ShardConfig, *, path: Path,
                 temp_dir: Path | None = None) -> None:
        self.shard = shard
        self.config = config
        self.path = path
        # Removed on close (the shard of an in-memory store).
        self.temp_dir = temp_dir
        self._lock = threading.Lock()  # index build vs close
        self._closed = False

    @classmethod
    def open(cls, path: Path | None, config: ShardConfig, *, temp_prefix: str = "tollgate-edge-") -> EdgePointStore:
        """Create the shard when ``path`` is missing or empty, else load it; then make its payload indexes.

        A shard whose vectors differ from ``config`` raises ``FailedPrecondition`` (``COLLECTION_MISMATCH``);
        one opened by another process raises the engine's error.
        """
        edge_config = config.to_edge()
        if path is None:
            temp = Path(tempfile.mkdtemp(prefix=temp_prefix))
            try:
                store = cls(qe.EdgeShard.create(str(temp), edge_config), config, path=temp, temp_dir=temp)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
        else:
            path.mkdir(parents=True, exist_ok=True)
            if not any(path.iterdir()):
                log.info("creating embedded shard at %s (%s)", path, config.describe())
                store = cls(qe.EdgeShard.create(str(path), edge_config), config, path=path)
            else:
                try:
                    store = cls(qe.EdgeShard.load(str(path), edge_config), config, path=path)
                except Exception as exc:
                    if "incompatible" in str(exc).lower():
                        raise FailedPrecondition(
                            f"embedded shard {path.name!r} does not have {config.describe()} "
                            "(made with another embedder?); use another collection name or remove it",
                            reason="COLLECTION_MISMATCH",
                        ) from None
                    raise
        try:
            store.ensure_indexes()
        except BaseException:
            store.close()
            raise
        return store

    def ensure_indexes(self) -> None:
        """Index the configured payload fields that are not indexed yet (idempotent)."""
        existing = self.shard.info().payload_schema
        for name, kind in self.config.indexes.items():
            if name not in existing:
                self.shard.update(qe.UpdateOperation.create_field_index(name, _edge_index_schema(kind)))

    def _vectors(self, point: Point) -> Any:
        dense = _as_list(point.vector)
        if self.config.dense_vector is None:
            if point.sparse is not None:
                raise ValueError("this store has no sparse vector")
            return dense
        vectors: dict[str, Any] = {self.config.dense_vector: dense}
        if point.sparse is not None:
            if self.config.sparse_vector is None:
                raise ValueError("this store has no sparse vector")
            vectors[self.config.sparse_vector] = _edge_sparse(point.sparse)
        return vectors

    def upsert(self, points: Sequence[Point]) -> None:
        if not points:
            return
        self.shard.update(qe.UpdateOperation.upsert_points(
            [qe.Point(p.id, self._vectors(p), dict(p.payload)) for p in points]))

    def _query(self, req: SearchRequest) -> qe.QueryRequest:
        flt = to_edge_filter(req.filter) if req.filter is not None else None
        dense = sparse = None
        dense_params = qe.SearchParams(hnsw_ef=req.hnsw_ef) if req.hnsw_ef is not None else None
        sparse_params = qe.SearchParams(idf=qe.IdfParams(corpus=to_edge_filter(req.idf_corpus))) \
            if req.idf_corpus is not None else None
        if req.dense is not None:
            dense = qe.Query.Nearest(_as_list(req.dense), using=self.config.dense_vector)
        if req.sparse is not None:
            if self.config.sparse_vector is None:
                raise ValueError("this store has no sparse vector")
            sparse = qe.Query.Nearest(_edge_sparse(req.sparse), using=self.config.sparse_vector)
        common: dict[str, Any] = {"limit": req.limit, "filter": flt, "with_payload": req.with_payload,
                                  "with_vector": False, "score_threshold": req.score_threshold}
        if dense is not None and sparse is not None:
            return qe.QueryRequest(
                prefetches=[qe.Prefetch(limit=req.prefetch_limit, query=dense, filter=flt, params=dense_params),
                            qe.Prefetch(limit=req.prefetch_limit, query=sparse, filter=flt, params=sparse_params)],
                # The stub types Fusion.Rrf as unrelated to Fusion; the engine takes it (and only it) for RRF.
                query=qe.Fusion.Rrf(k=req.rrf_k),  # type: ignore[arg-type]
                **common)
        if dense is not None:
            return qe.QueryRequest(query=dense, params=dense_params, **common)
        return qe.QueryRequest(query=sparse, params=sparse_params, **common)

    def search(self, request: SearchRequest) -> list[Hit]:
        return [Hit(str(p.id), float(p.score), p.payload or {}) for p in self.shard.query(self._query(request))]

    def count(self, flt: Filter | None = None) -> int:
        return int(self.shard.count(qe.CountRequest(exact=True,
                                                    filter=to_edge_filter(flt) if flt is not None else None)))

    def delete(self, flt: Filter) -> None:
        self.shard.update(qe.UpdateOperation.delete_points_by_filter(to_edge_filter(flt)))

    def delete_ids(self, point_ids: Sequence[str]) -> None:
        if point_ids:
            self.shard.update(qe.UpdateOperation.delete_points(list(point_ids)))

    def lowest(self, key: str, limit: int) -> list[str]:
        records, _ = self.shard.scroll(qe.ScrollRequest(limit=limit, order_by=qe.OrderBy(key, qe.Direction.Asc),
                                                        with_payload=False, with_vector=False))
        return [str(r.id) for r in records]

    def optimize(self) -> None:
        # A deleted point only leaves memory and disk when the optimizer rewrites (vacuums) its segment, and
        # the engine keeps the segments an optimisation replaced, mapped, until the next flush; the embedded
        # engine neither optimises nor flushes on a timer. So: optimise, then flush (which also truncates the
        # write-ahead log).
        with self._lock:
            if not self._closed:
                self.shard.optimize()
                self.shard.flush()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.shard.flush()
                self.shard.close()
            finally:
                if self.temp_dir is not None:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)


# -- blocking clients from asyncio ------------------------------------------------------------


class BlockingStore(abc.ABC, Generic[C]):
    """Lifecycle and call discipline for a store whose client is blocking.

    Each call runs in a worker thread, bounded by ``call_timeout_s`` and the
    request deadline (a late answer is abandoned and reported as
    ``Unavailable``/``BACKEND_TIMEOUT``); clients that are not thread-safe get
    their calls serialised by a lock. The client and collection are set up
    lazily and retried on the next call after a failure, so the service starts
    (and answers UNAVAILABLE) while the backend is down.
    """

    def __init__(self, client_factory: Callable[[], C], *, serialise: bool, call_timeout_s: float) -> None:
        self._client_factory = client_factory
        self._call_timeout_s = call_timeout_s
        self._client: C | None = None
        # Opening a client may outlast one request (an embedded store loads its data from disk),
        # so it runs as its own task that later requests wait on, never abandoned half-way.
        self._connecting: asyncio.Future[C] | None = None
        self._ready = False
        self._setup_lock = asyncio.Lock()
        # Held inside the worker thread, so an abandoned (timed out) call still excludes the next one.
        self._thread_lock: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if serialise else contextlib.nullcontext())

    @abc.abstractmethod
    def _prepare(self, client: C) -> None:
        """Make sure the collection exists with the expected vectors (runs in a worker thread)."""

    @abc.abstractmethod
    def _close_client(self, client: C) -> None: ...

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
                await asyncio.wait_for(asyncio.to_thread(self._locked, lambda: self._close_client(client)),
                                       self._call_timeout_s)

    async def _connect(self, deadline: Deadline) -> C:
        if self._connecting is None:
            task = asyncio.ensure_future(asyncio.to_thread(self._locked, self._client_factory))
            # Mark a failure seen even if no request is waiting any more when it happens.
            task.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._connecting = task
        timeout = deadline.hop_timeout(HOP_MARGIN_S, cap_s=self._call_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
        except TimeoutError:
            log.warning("vector store connect still running after %.2fs", timeout)
            raise Unavailable("vector store is still starting", reason="BACKEND_TIMEOUT", retry_after_s=1.0) from None
        except TollgateError:
            self._connecting = None
            raise
        except Exception as exc:
            self._connecting = None  # try afresh on the next request
            log.warning("vector store connect failed: %s: %.200s", type(exc).__name__, exc)
            raise Unavailable("vector store cannot be opened", reason="BACKEND_ERROR", retry_after_s=1.0) from None

    async def _ensure_ready(self, deadline: Deadline) -> C:
        if self._ready and self._client is not None:
            return self._client
        async with self._setup_lock:
            if self._client is None:
                self._client = await self._connect(deadline)
                self._connecting = None
            client = self._client
            if not self._ready:
                await self._run("ensure_collection", lambda: self._prepare(client), deadline)
                self._ready = True
            return client

    # -- calls -------------------------------------------------------------------------------

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._thread_lock:
            return fn()

    async def _run(self, op: str, fn: Callable[[], T], deadline: Deadline) -> T:
        timeout = deadline.hop_timeout(HOP_MARGIN_S, cap_s=self._call_timeout_s)
        try:
            return await asyncio.wait_for(asyncio.to_thread(self._locked, fn), timeout)
        except TimeoutError:
            log.warning("vector store %s timed out after %.2fs", op, timeout)
            self._ready = False
            raise Unavailable(f"vector store did not answer {op} in time", reason="BACKEND_TIMEOUT",
                              retry_after_s=1.0) from None
        except TollgateError:
            raise
        except Exception as exc:
            # Type and a bounded message only: backend errors never carry document text, but stay safe.
            log.warning("vector store %s failed: %s: %.200s", op, type(exc).__name__, exc)
            self._ready = False
            raise Unavailable(f"vector store failed during {op}", reason="BACKEND_ERROR", retry_after_s=1.0) from None

    async def _call(self, op: str, fn: Callable[[C], T], deadline: Deadline) -> T:
        client = await self._ensure_ready(deadline)
        return await self._run(op, lambda: fn(client), deadline)
