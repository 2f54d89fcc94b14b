"""Fuzz every CacheService RPC through a running server (real Redis, Qdrant Edge under a temp dir).

Each RPC gets ``FUZZ_EXAMPLES`` requests: anything its input type can hold, and valid requests with
hostile fields merged in (so the fuzzer also reaches the tiers behind validation). None may be
answered INTERNAL/UNKNOWN/DATA_LOSS, an INVALID_ARGUMENT must name its field, and the server must
still be SERVING after each one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from tollgate.cache.v1 import cache_pb2
from tollgate.common.v1 import common_pb2

from services.cache.server import build
from services.cache.settings import CacheSettings
from tests.support import infra
from tests.support.fuzz import (
    ServerErrorLog,
    fuzz_example,
    fuzz_settings,
    served_channel,
)
from tests.unit.cache.cache_test_support import static_model_dir

pytestmark = pytest.mark.fuzz

SERVICE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"]

_KEY = cache_pb2.CacheKeyInput(
    namespace=cache_pb2.CacheNamespace(tenant_id="fuzz", model_class="fast", system_prompt_hash="sp",
                                       prompt_version="v1"),
    model="gpt-x",
    messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_SYSTEM, content="Answer briefly."),
              common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content="What is the capital of France?")],
    params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=64),
)

# Valid requests per RPC, the bases hostile fields are merged into. A new RPC without an entry fails
# test_every_rpc_is_fuzzed (and its fuzz test).
VALID: dict[str, list[Message]] = {
    "Lookup": [cache_pb2.LookupRequest(key=_KEY), cache_pb2.LookupRequest(key=_KEY, allow_stale=True,
                                                                        semantic_threshold=0.5)],
    "Store": [cache_pb2.StoreRequest(key=_KEY, content="Paris.", usage=common_pb2.TokenUsage(input_tokens=3))],
    "Invalidate": [cache_pb2.InvalidateRequest(tenant_id="fuzz-other", prompt_version="v9")],
    "GetStats": [cache_pb2.GetStatsRequest(tenant_id="fuzz", per_namespace=True), cache_pb2.GetStatsRequest()],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[grpc.aio.Channel]:
    prefix = f"tgtest:{infra.unique_name('fuzzcache')}:"
    settings = CacheSettings(port=0, redis_url=infra.REDIS_URL, redis_prefix=prefix,
                             embedding_model_dir=str(static_model_dir()),
                             data_dir=str(tmp_path_factory.mktemp("cache-fuzz")))
    bindings, close = await build(settings)
    try:
        async with served_channel(settings, bindings, close) as ch:
            yield ch
    finally:
        await infra.delete_redis_prefix(infra.REDIS_URL, prefix)


def test_every_rpc_is_fuzzed() -> None:
    assert set(VALID) == {m.name for m in SERVICE.methods}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
@fuzz_settings()
@given(data=st.data())
async def test_fuzz_rpc(channel: grpc.aio.Channel, server_errors: ServerErrorLog, method_name: str,
                        data: st.DataObject) -> None:
    await fuzz_example(channel, SERVICE, method_name, VALID[method_name], data, server_errors)
