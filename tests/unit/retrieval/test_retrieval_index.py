from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from qdrant_client import QdrantClient

from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.embedding import HashingEmbedder
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.store import ChunkFilter, QdrantVectorStore, point_id

T = "tenant-a"


def make_store(path: Path | None = None, *, url: str = "", dim: int = 384, timeout_s: float = 5.0,
               collection: str = "chunks") -> QdrantVectorStore:
    return QdrantVectorStore.create(url=url, api_key="", path=path, collection=collection, dim=dim,
                                    call_timeout_s=timeout_s)


def make_index(store: QdrantVectorStore, dim: int = 384) -> DocumentIndex:
    return DocumentIndex(HashingEmbedder(dim), store, default_chunking=ChunkingOptions(8, 2))


@pytest.fixture
async def store() -> AsyncIterator[QdrantVectorStore]:
    s = make_store()
    await s.start(Deadline.after(5))
    yield s
    await s.close()


@pytest.fixture
def index(store: QdrantVectorStore) -> DocumentIndex:
    return make_index(store)


async def total(store: QdrantVectorStore, tenant: str = T) -> int:
    return await store.count(ChunkFilter(tenant), Deadline.after(5))


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


DOCS = [
    Document("billing", "The invoice for the quarterly cloud bill was paid by finance.", {"team": "finance"}),
    Document("hiking", "The hiking trip to the mountains was cancelled because of snow.", {"team": "social"}),
    Document("coffee", "The espresso machine in the kitchen needs descaling monthly.", {"team": "facilities"}),
]


async def test_ingest_search_delete_roundtrip(index: DocumentIndex, store: QdrantVectorStore) -> None:
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


async def test_reingest_is_idempotent(index: DocumentIndex, store: QdrantVectorStore) -> None:
    doc = Document("d", words("w", 30), {"v": "1"})
    first = await index.ingest(T, [doc])
    second = await index.ingest(T, [doc])
    assert first == second
    assert await total(store) == first[0].chunk_count == 5


async def test_shorter_new_version_leaves_no_stale_chunks(index: DocumentIndex, store: QdrantVectorStore) -> None:
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


async def test_same_document_id_in_two_tenants_is_two_documents(index: DocumentIndex, store: QdrantVectorStore) -> None:
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
