"""libs.vector_store on a real embedded Qdrant Edge shard: filters, dense/sparse/hybrid search, persistence,
payload indexes, mismatch detection, close, and the blocking-call discipline."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from libs.deadlines import Deadline
from libs.errors import FailedPrecondition, Unavailable
from libs.vector_store import (
    BlockingStore,
    EdgePointStore,
    Filter,
    Hit,
    IndexKind,
    Match,
    MatchAny,
    Point,
    Range,
    SearchRequest,
    ShardConfig,
)

DIM = 8
INDEXES = {"tenant": IndexKind.TENANT, "doc": IndexKind.KEYWORD, "n": IndexKind.INTEGER, "until": IndexKind.FLOAT}
PLAIN = ShardConfig(dim=DIM, indexes=INDEXES)
HYBRID = ShardConfig(dim=DIM, dense_vector="dense", sparse_vector="bm25", indexes=INDEXES)


@dataclass(frozen=True)
class Sparse:
    indices: tuple[int, ...]
    values: tuple[float, ...]


def pid(i: int) -> str:
    return str(uuid.UUID(int=i))


def axis(i: int, *, lean: int | None = None) -> np.ndarray:
    """A unit vector along axis ``i`` (tilted towards axis ``lean`` when given)."""
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    if lean is not None:
        v[lean] = 0.5
    return v / np.linalg.norm(v)


def point(i: int, tenant: str, vec: np.ndarray, *, doc: str = "d", n: int = 0, until: float = 10.0,
          sparse: Sparse | None = None) -> Point:
    return Point(pid(i), vec, {"tenant": tenant, "doc": doc, "n": n, "until": until}, sparse=sparse)


def ids(hits: list[Hit]) -> list[str]:
    return [h.id for h in hits]


@pytest.fixture
def store() -> Iterator[EdgePointStore]:
    s = EdgePointStore.open(None, PLAIN)
    yield s
    s.close()


@pytest.fixture
def hybrid() -> Iterator[EdgePointStore]:
    s = EdgePointStore.open(None, HYBRID)
    yield s
    s.close()


def test_dense_search_is_best_first_and_confined_to_the_filter(store: EdgePointStore) -> None:
    store.upsert([point(1, "a", axis(0)), point(2, "a", axis(0, lean=1)), point(3, "a", axis(2)),
                  point(4, "b", axis(0))])
    hits = store.search(SearchRequest(limit=10, dense=axis(0), filter=Filter(must=(Match("tenant", "a"),))))
    assert ids(hits) == [pid(1), pid(2), pid(3)]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload == {"tenant": "a", "doc": "d", "n": 0, "until": 10.0}
    assert hits[0].score > hits[1].score > hits[2].score
    other = store.search(SearchRequest(limit=10, dense=axis(0), filter=Filter(must=(Match("tenant", "b"),))))
    assert ids(other) == [pid(4)]
    assert ids(store.search(SearchRequest(limit=10, dense=axis(0), filter=Filter(must=(Match("tenant", "c"),))))) == []


def test_score_threshold_and_limit(store: EdgePointStore) -> None:
    store.upsert([point(1, "a", axis(0)), point(2, "a", axis(0, lean=1)), point(3, "a", axis(2))])
    assert ids(store.search(SearchRequest(limit=10, dense=axis(0), score_threshold=0.5))) == [pid(1), pid(2)]
    assert ids(store.search(SearchRequest(limit=1, dense=axis(0), hnsw_ef=16))) == [pid(1)]


def test_match_any_range_and_nested_should(store: EdgePointStore) -> None:
    store.upsert([point(i, "a", axis(i % DIM), doc=f"doc{i % 3}", n=i, until=float(i)) for i in range(1, 10)])
    any_doc = Filter(must=(Match("tenant", "a"), MatchAny("doc", ("doc1", "doc2"))))
    assert store.count(any_doc) == 6
    assert store.count(Filter(must=(Range("until", gt=4.0),))) == 5
    assert store.count(Filter(must=(Range("until", lte=4.0),))) == 4
    assert store.count(Filter(must=(Range("n", gte=3.0, lt=6.0),))) == 3
    # Chunks of doc0 from n >= 6 and of doc1 from n >= 4: {6, 9} and {4, 7}.
    stale = Filter(must=(Match("tenant", "a"),),
                   should=(Filter(must=(Match("doc", "doc0"), Range("n", gte=6.0))),
                           Filter(must=(Match("doc", "doc1"), Range("n", gte=4.0)))))
    assert store.count(stale) == 4
    store.delete(stale)
    assert store.count() == 5
    left = {h.payload["n"] for h in store.search(SearchRequest(limit=20, dense=axis(0)))}
    assert left == {1, 2, 3, 5, 8}


def test_delete_by_filter_leaves_the_rest(store: EdgePointStore) -> None:
    store.upsert([point(1, "a", axis(0)), point(2, "b", axis(0)), point(3, "a", axis(1), doc="x")])
    store.delete(Filter(must=(Match("tenant", "a"), Match("doc", "d"))))
    assert store.count() == 2
    assert store.count(Filter(must=(Match("tenant", "a"),))) == 1
    store.delete(Filter(must=(Match("tenant", "nobody"),)))
    assert store.count() == 2


def test_upsert_overwrites_the_same_id(store: EdgePointStore) -> None:
    store.upsert([point(1, "a", axis(0), doc="old")])
    store.upsert([point(1, "a", axis(3), doc="new")])
    store.upsert([])
    assert store.count() == 1
    [hit] = store.search(SearchRequest(limit=5, dense=axis(3)))
    assert hit.payload["doc"] == "new" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_sparse_and_hybrid_search(hybrid: EdgePointStore) -> None:
    hybrid.upsert([
        point(1, "a", axis(0), sparse=Sparse((7,), (1.0,))),  # dense match only
        point(2, "a", axis(0, lean=1), sparse=Sparse((5,), (1.0,))),  # both, second on each
        point(3, "a", axis(3), sparse=Sparse((5, 9), (2.0, 1.0))),  # sparse match only
        point(4, "b", axis(0), sparse=Sparse((5,), (3.0,))),  # another tenant
    ])
    tenant = Filter(must=(Match("tenant", "a"),))
    sparse = hybrid.search(SearchRequest(limit=10, sparse=Sparse((5,), (1.0,)), filter=tenant, idf_corpus=tenant))
    assert ids(sparse) == [pid(3), pid(2)]
    dense = hybrid.search(SearchRequest(limit=2, dense=axis(0), filter=tenant))
    assert ids(dense) == [pid(1), pid(2)]
    fused = hybrid.search(SearchRequest(limit=10, dense=axis(0), sparse=Sparse((5,), (1.0,)), filter=tenant,
                                        idf_corpus=tenant, rrf_k=61, prefetch_limit=2))
    # pid(2) is second in both lists; RRF puts it first: 2/(61+1) > 1/(61+0).
    assert ids(fused)[0] == pid(2)
    assert set(ids(fused)) == {pid(1), pid(2), pid(3)}
    assert fused[0].score == pytest.approx(2 / 62, rel=1e-4)


def test_the_idf_corpus_decides_the_sparse_scores(hybrid: EdgePointStore) -> None:
    # Term 5 is everywhere in tenant b, rare in tenant a: its IDF over a alone is higher than over the shard.
    hybrid.upsert([point(1, "a", axis(0), sparse=Sparse((5,), (1.0,))),
                   point(2, "a", axis(0), sparse=Sparse((6,), (1.0,)))]
                  + [point(10 + i, "b", axis(0), sparse=Sparse((5,), (1.0,))) for i in range(8)])
    tenant = Filter(must=(Match("tenant", "a"),))
    own = hybrid.search(SearchRequest(limit=1, sparse=Sparse((5,), (1.0,)), filter=tenant, idf_corpus=tenant))
    whole = hybrid.search(SearchRequest(limit=1, sparse=Sparse((5,), (1.0,)), filter=tenant))
    assert ids(own) == ids(whole) == [pid(1)]
    assert own[0].score > whole[0].score


def test_requests_and_points_that_cannot_be_served_are_refused(store: EdgePointStore) -> None:
    with pytest.raises(ValueError, match="dense or a sparse"):
        SearchRequest(limit=1)
    with pytest.raises(ValueError, match="rrf_k"):
        SearchRequest(limit=1, dense=axis(0), sparse=Sparse((1,), (1.0,)))
    with pytest.raises(ValueError, match="bound"):
        Range("until")
    with pytest.raises(ValueError, match="no sparse vector"):
        store.upsert([point(1, "a", axis(0), sparse=Sparse((1,), (1.0,)))])
    with pytest.raises(ValueError, match="no sparse vector"):
        store.search(SearchRequest(limit=1, sparse=Sparse((1,), (1.0,))))
    assert store.count() == 0


def test_payload_indexes_are_made_and_stay_made(tmp_path: Path) -> None:
    store = EdgePointStore.open(tmp_path / "shard", HYBRID)
    try:
        schema = store.shard.info().payload_schema
        assert set(schema) == set(INDEXES)
        store.ensure_indexes()
        assert set(store.shard.info().payload_schema) == set(INDEXES)
    finally:
        store.close()


def test_a_shard_persists_under_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "shard"
    first = EdgePointStore.open(path, HYBRID)
    first.upsert([point(1, "a", axis(2), sparse=Sparse((3,), (1.0,)))])
    first.close()
    assert first.temp_dir is None and path.is_dir() and any(path.iterdir())
    again = EdgePointStore.open(path, HYBRID)
    try:
        assert again.count() == 1
        assert ids(again.search(SearchRequest(limit=1, dense=axis(2)))) == [pid(1)]
        assert set(again.shard.info().payload_schema) == set(INDEXES)
    finally:
        again.close()


@pytest.mark.parametrize("other", [ShardConfig(dim=DIM * 2, dense_vector="dense", sparse_vector="bm25"),
                                   ShardConfig(dim=DIM, dense_vector="dense-other", sparse_vector="bm25")])
def test_a_shard_made_with_other_vectors_is_a_failed_precondition(tmp_path: Path, other: ShardConfig) -> None:
    EdgePointStore.open(tmp_path / "shard", HYBRID).close()
    with pytest.raises(FailedPrecondition) as info:
        EdgePointStore.open(tmp_path / "shard", other)
    assert info.value.reason == "COLLECTION_MISMATCH"
    assert "'shard'" in str(info.value) and other.describe() in str(info.value)


def test_a_shard_open_elsewhere_cannot_be_opened(tmp_path: Path) -> None:
    owner = EdgePointStore.open(tmp_path / "shard", PLAIN)
    try:
        with pytest.raises(Exception) as info:
            EdgePointStore.open(tmp_path / "shard", PLAIN)
        assert not isinstance(info.value, FailedPrecondition)
    finally:
        owner.close()
    EdgePointStore.open(tmp_path / "shard", PLAIN).close()


def test_an_in_memory_store_removes_its_folder_and_closes_once() -> None:
    store = EdgePointStore.open(None, PLAIN, temp_prefix="tollgate-test-vs-")
    folder = store.temp_dir
    assert folder is not None and folder.is_dir() and folder.name.startswith("tollgate-test-vs-")
    assert store.path == folder
    store.upsert([point(1, "a", axis(0))])
    store.optimize()
    assert store.count() == 1
    store.close()
    assert store.closed and not folder.exists()
    store.close()
    store.optimize()  # a no-op once closed, not an engine error


def test_describe_names_what_the_shard_must_hold() -> None:
    assert HYBRID.describe() == "a 8-dim cosine vector 'dense' and a 'bm25' sparse vector with IDF"
    assert PLAIN.describe() == "a 8-dim cosine vector"


# -- BlockingStore ------------------------------------------------------------------------------


class SlowStore(BlockingStore[EdgePointStore]):
    def __init__(self, path: Path, *, fail_opens: int = 0, serialise: bool = False,
                 call_timeout_s: float = 10.0) -> None:
        self.path = path
        self.fail_opens = fail_opens
        self.opens = 0
        super().__init__(self._open, serialise=serialise, call_timeout_s=call_timeout_s)

    def _open(self) -> EdgePointStore:
        self.opens += 1
        if self.opens <= self.fail_opens:
            raise OSError("disk not there yet")
        return EdgePointStore.open(self.path, PLAIN)

    def _prepare(self, client: EdgePointStore) -> None:
        client.ensure_indexes()

    def _close_client(self, client: EdgePointStore) -> None:
        client.close()

    async def count(self, deadline: Deadline, *, sleep_s: float = 0.0) -> int:
        def run(cl: EdgePointStore) -> int:
            time.sleep(sleep_s)
            return cl.count()
        return await self._call("count", run, deadline)


async def test_blocking_store_runs_calls_off_the_loop_and_closes(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "shard")
    await store.start(Deadline.after(10))
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def upsert(cl: EdgePointStore) -> None:
        seen.append(threading.get_ident())
        cl.upsert([point(1, "a", axis(0))])

    await store._call("upsert", upsert, Deadline.after(10))
    assert seen and seen[0] != loop_thread
    assert await store.count(Deadline.after(10)) == 1
    client = store._client
    await store.close()
    assert client is not None and client.closed


async def test_blocking_store_turns_a_slow_call_into_backend_timeout(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "shard", call_timeout_s=1.5)
    try:
        await store.start(Deadline.after(10))
        with pytest.raises(Unavailable) as info:
            await store.count(Deadline.after(10), sleep_s=2.5)
        assert info.value.reason == "BACKEND_TIMEOUT"
        # The request deadline bounds the call as well as call_timeout_s.
        await store.start(Deadline.after(10))
        with pytest.raises(Unavailable) as info:
            await store.count(Deadline.after(0.5), sleep_s=1.2)
        assert info.value.reason == "BACKEND_TIMEOUT"
        assert await store.count(Deadline.after(10)) == 0
    finally:
        await store.close()


async def test_blocking_store_retries_a_failed_open_on_the_next_call(tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "shard", fail_opens=1, serialise=True)
    try:
        with pytest.raises(Unavailable) as info:
            await store.count(Deadline.after(10))
        assert info.value.reason == "BACKEND_ERROR"
        assert await store.count(Deadline.after(10)) == 0
        assert store.opens == 2
    finally:
        await store.close()


async def test_blocking_store_passes_failed_preconditions_through(tmp_path: Path) -> None:
    EdgePointStore.open(tmp_path / "shard", HYBRID).close()
    store = SlowStore(tmp_path / "shard")
    try:
        with pytest.raises(FailedPrecondition):
            await store.count(Deadline.after(10))
    finally:
        await store.close()
