"""RetrievalService over real gRPC (in-process server on an ephemeral port, embedded Qdrant on disk)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from tollgate.retrieval.v1 import retrieval_pb2 as pb
from tollgate.retrieval.v1 import retrieval_pb2_grpc

from libs import static_model as model_setup
from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer
from services.retrieval.server import build
from services.retrieval.settings import RetrievalSettings

Stub = retrieval_pb2_grpc.RetrievalServiceStub

@pytest.fixture(scope="module", autouse=True)
def retrieval_model() -> None:
    """The default embedder's model (``make setup`` prepares it; a checkout without it pays the distillation once)."""
    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        model_setup.distill(model_setup.DEFAULT_DIR)

# ``await serve(**setting_overrides)`` -> a stub to a fresh in-process server.
Serve = Callable[..., Awaitable[Stub]]


async def start(settings: RetrievalSettings) -> tuple[GrpcServer, Callable[[], Awaitable[None]]]:
    bindings, close = await build(settings)
    server = GrpcServer(settings, bindings)
    await server.start()
    return server, close


@pytest.fixture
async def serve(clean_env: None, tmp_path: Path) -> AsyncIterator[Serve]:
    """Servers share ``tmp_path`` as data dir; all are stopped afterwards."""
    running: list[tuple[GrpcServer, Callable[[], Awaitable[None]], grpc.aio.Channel]] = []

    async def _serve(**overrides: object) -> Stub:
        values: dict[str, object] = {"port": 0, "data_dir": str(tmp_path), "chunk_tokens": 8, "overlap_tokens": 2}
        values.update(overrides)
        settings = RetrievalSettings(**values)  # type: ignore[arg-type]
        server, close = await start(settings)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        running.append((server, close, channel))
        return Stub(channel)

    yield _serve
    for server, close, channel in running:
        await channel.close()
        await server.stop(0)
        await close()


def doc(document_id: str, text: str, **metadata: str) -> pb.Document:
    return pb.Document(document_id=document_id, text=text, metadata=metadata)


DOCS = [
    doc("billing", "The invoice for the quarterly cloud bill was paid by finance.", team="finance"),
    doc("hiking", "The hiking trip to the mountains was cancelled because of snow.", team="social"),
    doc("coffee", "The espresso machine in the kitchen needs descaling monthly.", team="facilities"),
]


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = status_proto_from_rpc(err)
    assert status is not None
    out: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out.update({v.field: v.description for v in br.field_violations})
    return out


def error_reason(err: grpc.aio.AioRpcError) -> str:
    status = status_proto_from_rpc(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


async def test_ingest_search_delete_roundtrip(serve: Serve) -> None:
    stub = await serve()
    resp = await stub.Ingest(pb.IngestRequest(tenant_id="t1", documents=DOCS), timeout=10)
    assert [(d.document_id, d.chunk_count) for d in resp.documents] == [("billing", 2), ("hiking", 2), ("coffee", 2)]

    found = await stub.Search(pb.SearchRequest(tenant_id="t1", query="espresso machine descaling", top_k=2), timeout=10)
    assert len(found.hits) == 2
    top = found.hits[0]
    assert (top.document_id, top.chunk_id) == ("coffee", "coffee#0")
    assert "espresso" in top.text and dict(top.metadata) == {"team": "facilities"}
    assert top.score > found.hits[1].score

    # Other tenants see nothing; a metadata filter cannot reach the tenant.
    other = await stub.Search(pb.SearchRequest(tenant_id="t2", query="espresso", top_k=5), timeout=10)
    assert list(other.hits) == []
    sneaky = await stub.Search(pb.SearchRequest(tenant_id="t2", query="espresso", top_k=5,
                                                metadata_filter={"tenant_id": "t1"}), timeout=10)
    assert list(sneaky.hits) == []

    filtered = await stub.Search(pb.SearchRequest(tenant_id="t1", query="espresso", top_k=10,
                                                  mode=pb.SEARCH_MODE_HYBRID, metadata_filter={"team": "social"}),
                                 timeout=10)
    assert {h.document_id for h in filtered.hits} == {"hiking"}

    deleted = await stub.DeleteDocuments(pb.DeleteDocumentsRequest(tenant_id="t1", document_ids=["coffee", "nope"]),
                                         timeout=10)
    assert deleted.deleted_chunks == 2
    after = await stub.Search(pb.SearchRequest(tenant_id="t1", query="espresso machine", top_k=10), timeout=10)
    assert "coffee" not in {h.document_id for h in after.hits}


async def test_chunking_options_from_request(serve: Serve) -> None:
    stub = await serve()
    # "word" is one token for the default embedder's tokenizer, so windows count words here.
    text = " ".join(["word"] * 20)
    resp = await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[doc("d", text)],
                                              chunking=pb.ChunkingOptions(chunk_tokens=5, overlap_tokens=1)),
                             timeout=10)
    assert resp.documents[0].chunk_count == 5  # windows start at 0, 4, 8, 12, 16
    # Only chunk_tokens given: the default overlap (2) applies.
    resp = await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[doc("d", text)],
                                              chunking=pb.ChunkingOptions(chunk_tokens=4)), timeout=10)
    assert resp.documents[0].chunk_count == 9
    # A window no larger than the default overlap: the default shrinks to a quarter window (0 here).
    resp = await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[doc("d", text)],
                                              chunking=pb.ChunkingOptions(chunk_tokens=2)), timeout=10)
    assert resp.documents[0].chunk_count == 10


async def test_ingest_stream(serve: Serve) -> None:
    stub = await serve()

    async def batches() -> AsyncIterator[pb.IngestStreamRequest]:
        for i in range(5):
            yield pb.IngestStreamRequest(batch=pb.IngestRequest(tenant_id="t", documents=[
                doc(f"d{i}-{j}", f"batch {i} document {j} " + "word " * 10) for j in range(3)
            ]))

    resp = await stub.IngestStream(batches(), timeout=20)
    assert (resp.documents, resp.chunks) == (15, 15 * 2)
    # Numbers are where BM25 shines and static embeddings do not (every "batch N document M" looks alike).
    hits = await stub.Search(pb.SearchRequest(tenant_id="t", query="batch 3 document 1", top_k=1,
                                              mode=pb.SEARCH_MODE_SPARSE), timeout=10)
    assert hits.hits[0].document_id == "d3-1"
    assert hits.mode == pb.SEARCH_MODE_SPARSE


async def test_empty_ingest_stream_ingests_nothing(serve: Serve) -> None:
    stub = await serve()

    async def nothing() -> AsyncIterator[pb.IngestStreamRequest]:
        return
        yield

    resp = await stub.IngestStream(nothing(), timeout=10)
    assert (resp.documents, resp.chunks) == (0, 0)


async def test_ingest_stream_rejects_tenant_change(serve: Serve) -> None:
    stub = await serve()

    async def batches() -> AsyncIterator[pb.IngestStreamRequest]:
        yield pb.IngestStreamRequest(batch=pb.IngestRequest(tenant_id="t", documents=[doc("a", "one")]))
        yield pb.IngestStreamRequest(batch=pb.IngestRequest(tenant_id="u", documents=[doc("b", "two")]))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.IngestStream(batches(), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch.tenant_id" in violations(info.value)


@pytest.mark.parametrize(("call", "expected"), [
    ("ingest_no_tenant", {"tenant_id", }),
    ("ingest_bad_docs", {"documents[0].document_id", "documents[1].text", "documents[2].document_id",
                         "chunking.overlap_tokens"}),
    ("ingest_empty", {"documents"}),
    ("ingest_too_big", {"documents[0].text"}),
    ("ingest_window_too_big", {"chunking.chunk_tokens"}),
    ("search_bad", {"tenant_id", "query", "top_k", "mode"}),
    ("search_top_k_too_big", {"top_k"}),
    ("delete_bad", {"document_ids"}),
    ("delete_empty_id", {"document_ids[1]"}),
])
async def test_invalid_argument_with_field_violations(serve: Serve, call: str,
                                                      expected: set[str]) -> None:
    stub = await serve(max_document_bytes=100)
    requests = {
        "ingest_no_tenant": lambda: stub.Ingest(pb.IngestRequest(documents=DOCS)),
        "ingest_bad_docs": lambda: stub.Ingest(pb.IngestRequest(
            tenant_id="t", documents=[doc("", "text"), doc("a", "   "), doc("a", "dup")],
            chunking=pb.ChunkingOptions(chunk_tokens=4, overlap_tokens=4))),
        "ingest_empty": lambda: stub.Ingest(pb.IngestRequest(tenant_id="t")),
        "ingest_too_big": lambda: stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[doc("a", "x" * 101)])),
        "ingest_window_too_big": lambda: stub.Ingest(pb.IngestRequest(
            tenant_id="t", documents=DOCS, chunking=pb.ChunkingOptions(chunk_tokens=5000))),
        "search_bad": lambda: stub.Search(pb.SearchRequest(query="  ", top_k=0, mode=7)),  # type: ignore[arg-type]
        "search_top_k_too_big": lambda: stub.Search(pb.SearchRequest(tenant_id="t", query="q", top_k=101)),
        "delete_bad": lambda: stub.DeleteDocuments(pb.DeleteDocumentsRequest(tenant_id="t")),
        "delete_empty_id": lambda: stub.DeleteDocuments(pb.DeleteDocumentsRequest(tenant_id="t",
                                                                                  document_ids=["a", ""])),
    }
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await requests[call]()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(info.value)) == expected
    assert error_reason(info.value) == "INVALID_ARGUMENT"


async def test_unreachable_qdrant_is_unavailable_not_a_hang(serve: Serve) -> None:
    stub = await serve(qdrant_url="http://127.0.0.1:1", qdrant_timeout_s=2)
    started = time.monotonic()
    for call in (
        *(stub.Search(pb.SearchRequest(tenant_id="t", query="q", top_k=3, mode=mode), timeout=10)
          for mode in (pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID)),
        stub.Ingest(pb.IngestRequest(tenant_id="t", documents=DOCS), timeout=10),
        stub.DeleteDocuments(pb.DeleteDocumentsRequest(tenant_id="t", document_ids=["a"]), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_reason(info.value) == "BACKEND_ERROR"
    assert time.monotonic() - started < 5


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Accepts TCP connections (kernel backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


async def test_hanging_qdrant_is_unavailable_within_the_call_timeout(serve: Serve,
                                                                      silent_port: int) -> None:
    stub = await serve(qdrant_url=f"http://127.0.0.1:{silent_port}", qdrant_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Search(pb.SearchRequest(tenant_id="t", query="q", top_k=3), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(info.value) == "BACKEND_TIMEOUT"
    assert time.monotonic() - started < 2


ZOO = [
    doc("otter", "Sea otters float on their backs and crack shellfish with stones.", kind="mammal"),
    doc("heron", "A grey heron stands still in the shallow river waiting for fish.", kind="bird"),
    doc("salmon", "Salmon swim upstream to spawn where they hatched.", kind="fish"),
]


async def test_search_modes(serve: Serve) -> None:
    stub = await serve()
    await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=ZOO), timeout=10)
    await stub.Ingest(pb.IngestRequest(tenant_id="u", documents=[doc("x", "otters otters otters")]), timeout=10)
    results = {}
    for mode in (pb.SEARCH_MODE_UNSPECIFIED, pb.SEARCH_MODE_DENSE, pb.SEARCH_MODE_SPARSE, pb.SEARCH_MODE_HYBRID):
        resp = await stub.Search(pb.SearchRequest(tenant_id="t", query="otters", top_k=10, mode=mode), timeout=10)
        results[mode] = resp
        assert resp.hits[0].document_id == "otter"
        assert {h.document_id for h in resp.hits} <= {"otter", "heron", "salmon"}
    # Unspecified means the default, hybrid; the response says which mode ran.
    assert results[pb.SEARCH_MODE_UNSPECIFIED].mode == pb.SEARCH_MODE_HYBRID
    assert [h.chunk_id for h in results[pb.SEARCH_MODE_UNSPECIFIED].hits] == [
        h.chunk_id for h in results[pb.SEARCH_MODE_HYBRID].hits]
    assert results[pb.SEARCH_MODE_DENSE].mode == pb.SEARCH_MODE_DENSE
    # BM25 finds only the chunks with the term; dense ranks all of them; hybrid scores are RRF (2/61 at most).
    assert [h.document_id for h in results[pb.SEARCH_MODE_SPARSE].hits] == ["otter"]
    assert len(results[pb.SEARCH_MODE_DENSE].hits) == 6
    assert results[pb.SEARCH_MODE_HYBRID].hits[0].score == pytest.approx(2 / 61, rel=1e-4)
    filtered = await stub.Search(pb.SearchRequest(tenant_id="t", query="otters", top_k=10, mode=pb.SEARCH_MODE_SPARSE,
                                                  metadata_filter={"kind": "bird"}), timeout=10)
    assert list(filtered.hits) == []


async def test_default_model_is_a_static_model_of_its_own_vector_space(serve: Serve, tmp_path: Path) -> None:
    stub = await serve()
    await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=ZOO), timeout=10)
    # Semantic match without shared words: only a real embedding model can do this.
    resp = await stub.Search(pb.SearchRequest(tenant_id="t", query="a bird near water", top_k=1,
                                              mode=pb.SEARCH_MODE_DENSE), timeout=10)
    assert resp.hits[0].document_id == "heron"
    # The same data folder with another embedder is refused, not silently mixed.
    other = await serve(embedder="hashing")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await other.Search(pb.SearchRequest(tenant_id="t", query="q", top_k=1), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "COLLECTION_MISMATCH"


async def test_missing_model_stops_the_service_with_a_message(clean_env: None, tmp_path: Path) -> None:
    settings = RetrievalSettings(port=0, model_dir=str(tmp_path / "nowhere"))  # type: ignore[call-arg]
    with pytest.raises(SystemExit, match="not prepared"):
        await build(settings)


async def test_ingest_cli_streams_a_corpus_with_a_progress_bar(clean_env: None, tmp_path: Path) -> None:
    server, close = await start(RetrievalSettings(port=0, data_dir=str(tmp_path)))  # type: ignore[call-arg]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        await _run_cli(Stub(channel), server.port, tmp_path)
    finally:
        await channel.close()
        await server.stop(0)
        await close()


async def _run_cli(stub: Stub, port: int, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(130):
            f.write(json.dumps({"_id": f"d{i}", "title": f"Title {i}", "text": f"body of document number {i}",
                                "metadata": {"n": i}}) + "\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.retrieval.ingest_cli", "--tenant", "cli", "--jsonl", str(corpus),
        "--target", f"127.0.0.1:{port}", "--batch", "50",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "ingested 130 documents, 130 chunks" in out.decode()
    assert "130/130" in err.decode()  # the bar reached the end
    hits = await stub.Search(pb.SearchRequest(tenant_id="cli", query="Title 42", top_k=1,
                                              mode=pb.SEARCH_MODE_SPARSE), timeout=10)
    assert hits.hits[0].document_id == "d42"
    assert dict(hits.hits[0].metadata) == {"n": "42"}
    # A malformed corpus fails before anything is sent.
    corpus.write_text('{"_id": "a", "text": "fine"}\n{"text": "no id"}\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.retrieval.ingest_cli", "--tenant", "cli2", "--jsonl", str(corpus),
        "--target", f"127.0.0.1:{port}", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and "line 2" in err.decode()
    empty = await stub.Search(pb.SearchRequest(tenant_id="cli2", query="fine", top_k=1), timeout=10)
    assert list(empty.hits) == []
