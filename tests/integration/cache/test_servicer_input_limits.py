"""CacheService input limits and the defects the fuzzer found (tests/fuzz/test_fuzz_cache.py), over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2

from tests.integration.cache.test_servicer import _serve, key, violations

INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1


@pytest.fixture
async def stub(redis_url: str, redis_prefix: str) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async for s, _ in _serve(redis_url, redis_prefix):
        yield s


async def test_prices_and_token_counts_past_their_caps_are_invalid_argument(
        stub: cache_pb2_grpc.CacheServiceStub) -> None:
    """An int64 price on uint32 token counts would make one hit's saving overflow the 64-bit stats counter."""
    usage = common_pb2.TokenUsage(input_tokens=UINT32_MAX, output_tokens=UINT32_MAX)
    price = cache_pb2.TokenPrice(input_nano_usd_per_mtok=INT64_MAX, output_nano_usd_per_mtok=INT64_MAX,
                                 cached_input_nano_usd_per_mtok=INT64_MAX)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Store(cache_pb2.StoreRequest(key=key(), content="Paris.", usage=usage))
    assert set(violations(info.value)) == {"usage.input_tokens", "usage.output_tokens"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(cache_pb2.LookupRequest(key=key(), price=price))
    assert len(violations(info.value)) == 3
    stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"))
    assert not stats.degraded, stats.degraded_detail


async def test_every_limit_names_its_field(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    k = key()
    k.namespace.prompt_version = "v\x01"
    k.namespace.model_class = "m" * 129
    k.messages[1].name = "n\x00"
    k.params.stop.append("s" * 129)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Store(cache_pb2.StoreRequest(key=k, content="a\x00", usage=common_pb2.TokenUsage(
            input_tokens=10_000_001)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(info.value)) == {"key.namespace.prompt_version", "key.namespace.model_class",
                                           "key.messages[1].name", "key.params.stop[0]", "content",
                                           "usage.input_tokens"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Lookup(cache_pb2.LookupRequest(key=key(), semantic_threshold=float("nan"),
                                                  price=cache_pb2.TokenPrice(output_nano_usd_per_mtok=10**15 + 1)))
    assert set(violations(info.value)) == {"semantic_threshold", "price.output_nano_usd_per_mtok"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Invalidate(cache_pb2.InvalidateRequest(tenant_id="acme", model_class="a\nb"))
    assert set(violations(info.value)) == {"model_class"}
