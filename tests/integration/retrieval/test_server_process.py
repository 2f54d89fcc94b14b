"""``python -m services.retrieval`` as a real process: env settings, persistence across restarts, Qdrant down."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from tollgate.retrieval.v1 import retrieval_pb2 as pb
from tollgate.retrieval.v1 import retrieval_pb2_grpc

from libs import static_model as model_setup
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess

SECRET = "zanzibar-quokka-lighthouse"

@pytest.fixture(scope="module", autouse=True)
def retrieval_model() -> None:
    """The default embedder's model (``make setup`` prepares it; a checkout without it pays the distillation once)."""
    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        model_setup.distill(model_setup.DEFAULT_DIR)



def stub_for(proc: ServiceProcess) -> tuple[grpc.Channel, retrieval_pb2_grpc.RetrievalServiceStub]:
    channel = grpc.insecure_channel(proc.address)
    return channel, retrieval_pb2_grpc.RetrievalServiceStub(channel)


def test_embedded_qdrant_persists_across_restarts(clean_env: None, tmp_path: Path) -> None:
    port = free_port()
    env = {"TOLLGATE_RETRIEVAL_PORT": str(port), "TOLLGATE_DATA_DIR": str(tmp_path),
           "TOLLGATE_RETRIEVAL_GRACE_PERIOD_S": "1"}
    proc = ServiceProcess("retrieval", port, env, tmp_path).wait_ready()
    try:
        channel, stub = stub_for(proc)
        with channel:
            resp = stub.Ingest(pb.IngestRequest(tenant_id="t", documents=[
                pb.Document(document_id="d", text=f"The {SECRET} keeps ships off the rocks.")]), timeout=10)
            assert resp.documents[0].chunk_count == 1
    finally:
        assert proc.stop() == 0
    assert (tmp_path / "qdrant-edge" / "tollgate_chunks").is_dir()

    proc = ServiceProcess("retrieval", port, env, tmp_path).wait_ready()
    try:
        channel, stub = stub_for(proc)
        with channel:
            hits = stub.Search(pb.SearchRequest(tenant_id="t", query=SECRET, top_k=1), timeout=10).hits
            assert [h.document_id for h in hits] == ["d"]
    finally:
        assert proc.stop() == 0
    # Ids and counts only: no document or query text in the logs.
    log = proc.log()
    assert "search tenant=t mode=hybrid top_k=1" in log
    assert SECRET not in log


def test_serves_and_answers_unavailable_when_qdrant_is_down(clean_env: None, tmp_path: Path) -> None:
    port = free_port()
    env = {"TOLLGATE_RETRIEVAL_PORT": str(port), "TOLLGATE_QDRANT_URL": "http://127.0.0.1:1",
           "TOLLGATE_RETRIEVAL_QDRANT_TIMEOUT_S": "2", "TOLLGATE_RETRIEVAL_GRACE_PERIOD_S": "1"}
    proc = ServiceProcess("retrieval", port, env, tmp_path).wait_ready()
    try:
        channel, stub = stub_for(proc)
        with channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Search(pb.SearchRequest(tenant_id="t", query="anything", top_k=3), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            assert time.monotonic() - started < 5
    finally:
        assert proc.stop() == 0
    assert "vector store not ready" in proc.log()
