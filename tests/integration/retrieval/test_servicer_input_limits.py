"""RetrievalService input limits over real gRPC: every field has a bound, and each violation names its field."""

from __future__ import annotations

import grpc
import pytest
from tollgate.retrieval.v1 import retrieval_pb2 as pb

from tests.integration.retrieval.test_servicer import Serve, retrieval_model, serve, violations

__all__ = ["retrieval_model", "serve"]  # fixtures, re-used from the gRPC tests


async def test_every_limit_names_its_field(serve: Serve) -> None:
    stub = await serve()
    docs = [pb.Document(document_id="d\n1", text="nul\x00inside", metadata={"k": "v\x01"}),
            pb.Document(document_id="x" * 257, text="form\x0cfeed is fine", metadata={"": "v"}),
            pb.Document(document_id="d3", text="ok", metadata={f"k{i}": "v" for i in range(33)})]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Ingest(pb.IngestRequest(tenant_id="t\x00", documents=docs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(info.value)) == {
        "tenant_id", "documents[0].document_id", "documents[0].text", "documents[0].metadata['k']",
        "documents[1].document_id", "documents[1].metadata", "documents[2].metadata"}

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Search(pb.SearchRequest(tenant_id="t", query="a\x00b", top_k=101, mode=7,
                                           metadata_filter={"k" * 129: "v"}))
    assert set(violations(info.value)) == {"query", "top_k", "mode", "metadata_filter['" + "k" * 128 + "']"}

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.DeleteDocuments(pb.DeleteDocumentsRequest(tenant_id="t", document_ids=["ok", "", "a\tb"]))
    assert set(violations(info.value)) == {"document_ids[1]", "document_ids[2]"}


async def test_free_text_keeps_other_control_characters(serve: Serve) -> None:
    stub = await serve()
    reply = await stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[
        pb.Document(document_id="d1", text="page one\x0cpage two\x1b[0m")]))
    assert reply.documents[0].chunk_count >= 1
    hits = await stub.Search(pb.SearchRequest(tenant_id="t", query="page\x0ctwo", top_k=1))
    assert hits.hits and hits.hits[0].document_id == "d1"
