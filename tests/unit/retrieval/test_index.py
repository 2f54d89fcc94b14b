from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.edge_store import EdgeVectorStore
from services.retrieval.embedding import HashingEmbedder
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.rerank import Reranker
from services.retrieval.sparse import Bm25Encoder
from services.retrieval.store import RRF_K, ChunkFilter, QdrantVectorStore, SearchMode, VectorStore, point_id

T = "tenant-a"


def make_store(path: Path | None = None, *, url: str = "", dim: int = 384, timeout_s: float = 5.0,
               collection: str = "chunks") -> QdrantVectorStore:
    return QdrantVectorStore.create(url=url, api_key="", path=path, collection=collection, dim=dim,
                                    call_timeout_s=timeout_s)


def make_index(store: VectorStore, dim: int = 384, reranker: Reranker | None = None) -> DocumentIndex:
    return DocumentIndex(HashingEmbedder(dim), store, default_chunking=ChunkingOptions(8, 2), sparse=Bm25Encoder(),
                         reranker=reranker)


@pytest.fixture(params=["edge", "local"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[VectorStore]:
    """Every behaviour holds on both embedded engines (Qdrant Edge, the default, and qdrant-client local mode)."""
    s: VectorStore = EdgeVectorStore(None, dim=384) if request.param == "edge" else make_store()
    await s.start(Deadline.after(5))
    yield s
    await s.close()


@pytest.fixture
def index(store: VectorStore) -> DocumentIndex:
    return make_index(store)


async def total(store: VectorStore, tenant: str = T) -> int:
    return await store.count(ChunkFilter(tenant), Deadline.after(5))


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


DOCS = [
    Document("billing", "The invoice for the quarterly cloud bill was paid by finance.", {"team": "finance"}),
    Document("hiking", "The hiking trip to the mountains was cancelled because of snow.", {"team": "social"}),
    Document("coffee", "The espresso machine in the kitchen needs descaling monthly.", {"team": "facilities"}),
]


async def test_ingest_search_delete_roundtrip(index: DocumentIndex, store: VectorStore) -> None:
    ingested = await index.ingest(T, [*DOCS, Document("long", words("x", 20), {"team": "x"})])
    assert [(d.document_id, d.chunk_count) for d in ingested] == [
        ("billing", 2), ("hiking", 2), ("coffee", 2), ("long", 3)]
    assert await total(store) == 9

    hits = await index.search(T, "espresso machine descaling", top_k=3)
    assert hits[0].document_id == "coffee"
    assert hits[0].chunk_id == "coffee#0"
    assert hits[0].metadata == {"team": "facilities"}
    assert "espresso" in hits[0].text
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert len(hits) == 3

    filtered = await index.search(T, "espresso machine descaling", top_k=10, metadata_filter={"team": "finance"})
    assert {h.document_id for h in filtered} == {"billing"}
    assert await index.search(T, "espresso", top_k=10, metadata_filter={"team": "nobody"}) == []

    assert await index.delete(T, ["coffee", "unknown"]) == 2
    assert await index.delete(T, ["coffee"]) == 0
    assert all(h.document_id != "coffee" for h in await index.search(T, "espresso machine", top_k=10))
    assert await total(store) == 7


async def test_reingest_is_idempotent(index: DocumentIndex, store: VectorStore) -> None:
    doc = Document("d", words("w", 30), {"v": "1"})
    first = await index.ingest(T, [doc])
    second = await index.ingest(T, [doc])
    assert first == second
    assert await total(store) == first[0].chunk_count == 5


async def test_shorter_new_version_leaves_no_stale_chunks(index: DocumentIndex, store: VectorStore) -> None:
    await index.ingest(T, [Document("d", words("old", 40)), Document("other", words("keep", 10))])
    assert await total(store) == 7 + 2
    [new] = await index.ingest(T, [Document("d", "a brand new short version", {"v": "2"})])
    assert new.chunk_count == 1
    assert await total(store) == 1 + 2
    hits = await index.search(T, words("old", 5), top_k=100)
    assert [h.chunk_id for h in hits if h.document_id == "d"] == ["d#0"]
    assert all("old" not in h.text for h in hits)
    assert hits[0].metadata == {"v": "2"} or hits[0].document_id == "other"


async def test_chunking_override(index: DocumentIndex) -> None:
    [doc] = await index.ingest(T, [Document("d", words("w", 10))], ChunkingOptions(chunk_tokens=2, overlap_tokens=0))
    assert doc.chunk_count == 5


async def test_same_document_id_in_two_tenants_is_two_documents(index: DocumentIndex, store: VectorStore) -> None:
    await index.ingest("a", [Document("d", words("alpha", 30))])
    await index.ingest("b", [Document("d", "tiny")])  # must not trim tenant a's chunks of "d"
    assert await total(store, "a") == 5
    assert await total(store, "b") == 1
    assert point_id("a", "d", 0) != point_id("b", "d", 0)
    assert await index.delete("b", ["d"]) == 1
    assert await total(store, "a") == 5


async def test_invalid_input(index: DocumentIndex) -> None:
    with pytest.raises(InvalidArgument):
        await index.ingest("", DOCS)
    with pytest.raises(InvalidArgument):
        await index.ingest(T, [DOCS[0], DOCS[0]])
    with pytest.raises(InvalidArgument):
        await index.search("", "q", 3)
    with pytest.raises(InvalidArgument):
        await index.delete("", ["d"])
    with pytest.raises(ValueError):
        ChunkFilter("")
    assert await index.ingest(T, []) == []
    assert await index.delete(T, []) == 0


async def test_expired_deadline_is_deadline_exceeded(index: DocumentIndex) -> None:
    with pytest.raises(DeadlineExceeded):
        await index.search(T, "anything", 3, deadline=Deadline.after(0))


async def test_embedded_store_persists_on_disk(tmp_path: Path) -> None:
    store = make_store(tmp_path / "qdrant")
    await make_index(store).ingest(T, DOCS)
    await store.close()

    reopened = make_store(tmp_path / "qdrant")
    try:
        hits = await make_index(reopened).search(T, "hiking in the snow", top_k=1)
        assert hits[0].document_id == "hiking"
    finally:
        await reopened.close()


async def test_locked_local_storage_is_unavailable(tmp_path: Path) -> None:
    owner = make_store(tmp_path / "qdrant")
    await owner.start(Deadline.after(5))
    try:
        other = make_store(tmp_path / "qdrant")
        with pytest.raises(Unavailable) as info:
            await make_index(other).search(T, "anything", 3)
        assert info.value.reason == "BACKEND_ERROR"
    finally:
        await owner.close()


async def test_dimension_mismatch_is_failed_precondition(tmp_path: Path) -> None:
    store = make_store(tmp_path / "qdrant", dim=384)
    await store.start(Deadline.after(5))
    await store.close()
    other = make_store(tmp_path / "qdrant", dim=64)
    try:
        with pytest.raises(FailedPrecondition):
            await make_index(other, dim=64).search(T, "anything", 3)
    finally:
        await other.close()


async def test_unreachable_server_is_unavailable_promptly() -> None:
    store = make_store(url="http://127.0.0.1:1", timeout_s=2.0)
    index = make_index(store)
    started = time.monotonic()
    for call in (index.search(T, "q", 3), index.ingest(T, DOCS), index.delete(T, ["d"])):
        with pytest.raises(Unavailable) as info:
            await call
        assert info.value.reason == "BACKEND_ERROR"
    assert time.monotonic() - started < 3.0
    await store.close()


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


async def test_hanging_server_times_out_as_unavailable(silent_server: str) -> None:
    store = make_store(url=silent_server, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        await make_index(store).search(T, "q", 3)
    assert info.value.reason == "BACKEND_TIMEOUT"
    assert time.monotonic() - started < 1.0
    await asyncio.wait_for(store.close(), 3)


async def test_slow_open_is_unavailable_then_ready_without_starting_over() -> None:
    """Opening an embedded store can outlast a request: callers get UNAVAILABLE, the open is not abandoned."""
    opened: list[int] = []

    def slow_factory() -> QdrantClient:
        time.sleep(0.6)
        opened.append(1)
        return QdrantClient(location=":memory:", force_disable_check_same_thread=True)

    store = QdrantVectorStore(slow_factory, collection="c", dim=384, local=True, call_timeout_s=0.2)
    index = make_index(store)
    with pytest.raises(Unavailable) as info:
        await index.search(T, "q", 3)
    assert info.value.reason == "BACKEND_TIMEOUT"
    await asyncio.sleep(0.7)
    assert await index.search(T, "q", 3) == []
    assert opened == [1]
    await store.close()


# -- search modes, fusion, BM25 ------------------------------------------------------------------

ZOO = [
    Document("otter", "Sea otters float on their backs and crack shellfish with stones."),
    Document("heron", "A grey heron stands still in the shallow river waiting for fish."),
    Document("otter-river", "River otters hunt fish in cold streams at dawn."),
    Document("falcon", "Peregrine falcons dive faster than any other bird."),
    Document("salmon", "Salmon swim upstream to spawn where they hatched."),
]


async def test_sparse_mode_returns_only_chunks_sharing_a_term(index: DocumentIndex) -> None:
    await index.ingest(T, ZOO)
    hits = await index.search(T, "otters eating fish", top_k=10, mode=SearchMode.SPARSE)
    # Stemming: "otters" matches "otters", "fish" matches "fish"; falcon shares no term.
    assert {h.document_id for h in hits} == {"otter", "heron", "otter-river"}
    assert hits[0].document_id == "otter-river"  # both terms
    assert all(h.score > 0 for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Dense mode ranks every chunk of the tenant (cosine), up to top_k.
    dense = await index.search(T, "otters eating fish", top_k=20, mode=SearchMode.DENSE)
    assert {h.document_id for h in dense} == {d.document_id for d in ZOO}


async def test_hybrid_is_reciprocal_rank_fusion_with_k_60(index: DocumentIndex) -> None:
    await index.ingest(T, [*ZOO, *(Document(f"filler-{i}", f"birds and fish number {i} swim or fly") for i in
                                   range(12))])
    query = "river otters fish"
    dense = await index.search(T, query, top_k=100, mode=SearchMode.DENSE)
    sparse = await index.search(T, query, top_k=100, mode=SearchMode.SPARSE)
    hybrid = await index.search(T, query, top_k=100, mode=SearchMode.HYBRID)
    expected: dict[str, float] = {}
    for ranking in (dense, sparse):
        for rank, hit in enumerate(ranking, start=1):
            expected[hit.chunk_id] = expected.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    assert {h.chunk_id for h in hybrid} == set(expected)
    for hit in hybrid:
        assert hit.score == pytest.approx(expected[hit.chunk_id], rel=1e-5), hit.chunk_id
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    # The chunk both retrievers rank first gets 2 / (60 + 1).
    assert dense[0].chunk_id == sparse[0].chunk_id == hybrid[0].chunk_id
    assert hybrid[0].score == pytest.approx(2 / 61, rel=1e-5)


async def test_stop_word_query_falls_back_to_dense_in_hybrid(index: DocumentIndex) -> None:
    await index.ingest(T, ZOO)
    assert await index.search(T, "the of and", top_k=3, mode=SearchMode.SPARSE) == []
    hits = await index.search(T, "the of and", top_k=3, mode=SearchMode.HYBRID)
    assert len(hits) == 3


async def test_bm25_statistics_are_per_tenant(index: DocumentIndex) -> None:
    """Another tenant's documents never move a tenant's BM25 scores (IDF over the tenant's own chunks)."""
    await index.ingest(T, ZOO)
    before = [(h.chunk_id, h.score) for h in await index.search(T, "otters fish", 10, mode=SearchMode.SPARSE)]
    await index.ingest("tenant-b", [Document(f"b{i}", "otters otters fish fish everywhere") for i in range(30)])
    after = [(h.chunk_id, h.score) for h in await index.search(T, "otters fish", 10, mode=SearchMode.SPARSE)]
    assert after == before
    # The tenant's own new documents do change them (IDF is live), so the check above could fail.
    await index.ingest(T, [Document(f"more{i}", "fish market") for i in range(5)])
    again = dict((h.chunk_id, h.score) for h in await index.search(T, "otters fish", 10, mode=SearchMode.SPARSE))
    assert again["otter-river#0"] != dict(before)["otter-river#0"]


class ReverseReranker:
    """Puts the fused candidates in reverse order; records what it saw."""

    def __init__(self, candidates: int) -> None:
        self._candidates = candidates
        self.seen: list[list[str]] = []

    @property
    def candidates(self) -> int:
        return self._candidates

    def rerank(self, query: str, texts: Sequence[str]) -> list[tuple[int, float]]:
        self.seen.append(list(texts))
        n = len(texts)
        return [(i, float(n - j)) for j, i in enumerate(reversed(range(n)))] + [(99, 1.0), (0, 0.5)]


async def test_reranker_reorders_the_fused_candidates(store: VectorStore) -> None:
    reranker = ReverseReranker(candidates=4)
    index = make_index(store, reranker=reranker)
    plain = make_index(store)
    await index.ingest(T, ZOO)
    await index.ingest("other", [Document("x", "otters otters otters fish")])
    fused = await plain.search(T, "otters fish", top_k=4)
    reranked = await index.search(T, "otters fish", top_k=2)
    # The reranker saw the tenant's 4 best fused candidates, and its order (and scores) won.
    assert reranker.seen == [[h.text for h in fused]]
    assert [h.chunk_id for h in reranked] == [fused[3].chunk_id, fused[2].chunk_id]
    assert [h.score for h in reranked] == [4.0, 3.0]
    # Invented or repeated positions are ignored: every candidate comes back once.
    every = await index.search(T, "otters fish", top_k=50)
    assert sorted(h.chunk_id for h in every) == sorted(h.chunk_id for h in await plain.search(T, "otters fish", 50))


# -- the embedded default engine (Qdrant Edge) -------------------------------------------------------

async def test_edge_store_persists_on_disk(tmp_path: Path) -> None:
    store = EdgeVectorStore(tmp_path / "edge", dim=384)
    await make_index(store).ingest(T, DOCS)
    await store.close()
    reopened = EdgeVectorStore(tmp_path / "edge", dim=384)
    try:
        hits = await make_index(reopened).search(T, "hiking in the snow", top_k=1)
        assert hits[0].document_id == "hiking"
        assert await total(reopened) == 6
    finally:
        await reopened.close()


async def test_edge_store_opened_twice_is_unavailable(tmp_path: Path) -> None:
    owner = EdgeVectorStore(tmp_path / "edge", dim=384)
    await owner.start(Deadline.after(5))
    try:
        other = EdgeVectorStore(tmp_path / "edge", dim=384)
        with pytest.raises(Unavailable) as info:
            await make_index(other).search(T, "anything", 3)
        assert info.value.reason == "BACKEND_ERROR"
    finally:
        await owner.close()


@pytest.mark.parametrize(("dim", "name"), [(64, "dense"), (384, "dense-other-model")])
async def test_edge_store_made_by_another_embedder_is_failed_precondition(tmp_path: Path, dim: int,
                                                                         name: str) -> None:
    store = EdgeVectorStore(tmp_path / "edge", dim=384)
    await store.start(Deadline.after(5))
    await store.close()
    other = EdgeVectorStore(tmp_path / "edge", dim=dim, dense_vector=name)
    try:
        with pytest.raises(FailedPrecondition):
            await make_index(other, dim=dim).search(T, "anything", 3)
    finally:
        await other.close()


async def test_in_memory_edge_store_leaves_nothing_behind() -> None:
    store = EdgeVectorStore(None, dim=384)
    await make_index(store).ingest(T, DOCS)
    folder = store._client.temp_dir if store._client else None
    assert folder is not None and folder.is_dir()
    await store.close()
    assert not folder.exists()
