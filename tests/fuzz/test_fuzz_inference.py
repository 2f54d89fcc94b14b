"""Fuzz every InferenceService RPC through a running server (the HTTP engine against the fake provider).

vLLM on CPU is too slow for thousands of generations; the validation under test is the servicer's
(InferenceServicer checks every field before the engine is called), so it is the same for every engine.
Each RPC gets ``FUZZ_EXAMPLES`` requests: anything its input type can
hold, and valid requests with hostile fields merged in, so valid generations stream from the provider
and are cancelled after a few messages (call_stream). No call may be answered INTERNAL/UNKNOWN/DATA_LOSS,
an INVALID_ARGUMENT must name its field, and the server must still be SERVING after each one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2

from services.inference.server import build
from services.inference.settings import InferenceSettings
from tests.support.fuzz import (
    ServerErrorLog,
    fuzz_example,
    fuzz_settings,
    served_channel,
)
from tools.fake_provider import FakeProvider

pytestmark = pytest.mark.fuzz

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]

_MESSAGES = [common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_SYSTEM, content="Answer briefly."),
             common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content="Say hello.")]

# Valid requests per RPC, the bases hostile fields are merged into. A new RPC without an entry fails
# test_every_rpc_is_fuzzed (and its fuzz test).
VALID: dict[str, list[Message]] = {
    "Generate": [inference_pb2.GenerateRequest(request_id="r1", model="tiny", messages=_MESSAGES,
                                               params=common_pb2.GenerationParams(max_output_tokens=8,
                                                                                  temperature=0.5))],
    "CountTokens": [inference_pb2.CountTokensRequest(model="tiny", messages=_MESSAGES)],
    "ListModels": [inference_pb2.ListModelsRequest()],
    "GetLoad": [inference_pb2.GetLoadRequest()],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    async with FakeProvider() as fake:
        settings = InferenceSettings(port=0, provider_base_url=fake.url, provider_name="fakeai",
                                     served_models="tiny=fake-small,other", context_window=4096)
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
    await fuzz_example(channel, SERVICE, method_name, VALID[method_name], data, server_errors)
