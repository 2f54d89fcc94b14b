"""Fuzz every RetrievalService RPC through a running server (Qdrant Edge under a temp dir, the model2vec
embedder ``make setup`` prepares).

Each RPC gets ``FUZZ_EXAMPLES`` requests: anything its input type can hold, and valid requests with
hostile fields merged in (so the fuzzer also reaches chunking, embedding and the index). IngestStream
gets a stream of up to four batches, and one stream in eight is cancelled after its first batch. No
call may be answered INTERNAL/UNKNOWN/DATA_LOSS, an INVALID_ARGUMENT must name its field, and the
server must still be SERVING after each one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from hypothesis import event, given
from hypothesis import strategies as st
from tollgate.retrieval.v1 import retrieval_pb2 as pb

from libs import static_model as model_setup
from services.retrieval.server import build
from services.retrieval.settings import RetrievalSettings
from tests.support.fuzz import (
    ServerErrorLog,
    call_raw,
    fuzz_example,
    fuzz_settings,
    served_channel,
)

pytestmark = pytest.mark.fuzz

SERVICE = pb.DESCRIPTOR.services_by_name["RetrievalService"]

_BATCH = pb.IngestRequest(tenant_id="fuzz", documents=[
    pb.Document(document_id="d1", text="The invoice for the quarterly cloud bill was paid.", metadata={"team": "a"}),
    pb.Document(document_id="d2", text="The hiking trip was cancelled because of snow."),
], chunking=pb.ChunkingOptions(chunk_tokens=16, overlap_tokens=4))

# Valid requests per RPC, the bases hostile fields are merged into. A new RPC without an entry fails
# test_every_rpc_is_fuzzed (and its fuzz test).
VALID: dict[str, list[Message]] = {
    "Ingest": [_BATCH],
    "IngestStream": [pb.IngestStreamRequest(batch=_BATCH)],
    "Search": [pb.SearchRequest(tenant_id="fuzz", query="cloud bill", top_k=5),
               pb.SearchRequest(tenant_id="fuzz", query="snow", top_k=3, mode=pb.SEARCH_MODE_SPARSE,
                                metadata_filter={"team": "a"})],
    "DeleteDocuments": [pb.DeleteDocumentsRequest(tenant_id="fuzz-other", document_ids=["d1", "nope"])],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[grpc.aio.Channel]:
    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        model_setup.distill(model_setup.DEFAULT_DIR)
    # Documents up to 64 KiB instead of 1 MiB: a valid megabyte document costs seconds of chunking and
    # embedding per example; the limit is enforced by the same code either way.
    settings = RetrievalSettings(port=0, data_dir=str(tmp_path_factory.mktemp("retrieval-fuzz")),
                                 max_document_bytes=65_536)
    bindings, close = await build(settings)
    async with served_channel(settings, bindings, close) as ch:
        yield ch


def test_every_rpc_is_fuzzed() -> None:
    assert set(VALID) == {m.name for m in SERVICE.methods}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
@fuzz_settings()
@given(data=st.data())
async def test_fuzz_rpc(channel: grpc.aio.Channel, server_errors: ServerErrorLog, method_name: str,
                        data: st.DataObject) -> None:
    await fuzz_example(channel, SERVICE, method_name, VALID[method_name], data, server_errors, cancel_one_stream_in=8)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
@fuzz_settings()
@given(payloads=st.lists(st.binary(max_size=256), min_size=1, max_size=3))
async def test_fuzz_raw_bytes(channel: grpc.aio.Channel, server_errors: ServerErrorLog, method_name: str,
                              payloads: list[bytes]) -> None:
    # The wire format itself, not just its values: any bytes, through the interceptor every service shares
    # (libs/grpc_errors.py), so one service stands for all five. grpcio answered INTERNAL before.
    where = f"RetrievalService.{method_name} (raw bytes)"
    code = await call_raw(channel, SERVICE, method_name, payloads, where)
    event(code.name)
    server_errors.check(where)
