"""CacheService over real gRPC (in-process server on port 0, and one real process) against real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import qdrant_edge as qe
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2

from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer
from services.cache.server import build
from services.cache.settings import CacheSettings
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess
from tests.unit.cache.cache_test_support import static_model_dir

USER = common_pb2.MESSAGE_ROLE_USER
SYSTEM = common_pb2.MESSAGE_ROLE_SYSTEM


def key(tenant: str = "acme", text: str = "What is the capital of France?", **ns: str) -> cache_pb2.CacheKeyInput:
    return cache_pb2.CacheKeyInput(
        namespace=cache_pb2.CacheNamespace(tenant_id=tenant, model_class=ns.get("model_class", "fast"),
                                           system_prompt_hash="sp", prompt_version=ns.get("prompt_version", "v1")),
        model="gpt-x",
        messages=[common_pb2.ChatMessage(role=SYSTEM, content="Answer briefly."),
                  common_pb2.ChatMessage(role=USER, content=text)],
        params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=64),
    )


USAGE = common_pb2.TokenUsage(input_tokens=20, output_tokens=3, cached_input_tokens=5)



async def _serve(redis_url: str, redis_prefix: str, **extra: object
                 ) -> AsyncIterator[tuple[cache_pb2_grpc.CacheServiceStub, int]]:
    options: dict[str, object] = {"embedding_model_dir": str(static_model_dir()), **extra}
    s = CacheSettings(port=0, redis_url=redis_url, redis_prefix=redis_prefix, max_entry_bytes=1000,
                      **options)  # type: ignore[arg-type]
    bindings, close = await build(s)
    server = GrpcServer(s, bindings)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield cache_pb2_grpc.CacheServiceStub(channel), port
    finally:
        await channel.close()
        await server.stop(0)
        await close()


@pytest.fixture
async def stub(redis_url: str, redis_prefix: str) -> AsyncIterator[cache_pb2_grpc.CacheServiceStub]:
    async for s, _ in _serve(redis_url, redis_prefix):
        yield s


def violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = status_proto_from_rpc(err)
    assert status is not None
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            found.update({v.field: v.description for v in br.field_violations})
    return found


async def test_store_then_lookup_hit_and_miss(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    stored = await stub.Store(cache_pb2.StoreRequest(key=key(), content="Paris.", usage=USAGE, ttl_seconds=120))
    assert stored.entry_id
    hit = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="  What is the capital of   France?")))
    assert hit.tier == common_pb2.CACHE_TIER_EXACT
    assert (hit.content, hit.model, hit.entry_id, hit.stale) == ("Paris.", "gpt-x", stored.entry_id, False)
    assert hit.usage == USAGE and hit.similarity == pytest.approx(1.0)
    assert hit.stored_at.seconds > 1_700_000_000

    miss = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="What is the capital of Spain?")))
    assert miss.tier == common_pb2.CACHE_TIER_MISS and miss.content == "" and not miss.entry_id

    stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"))
    assert (stats.exact_hits, stats.misses, stats.stores, stats.degraded) == (1, 1, 1, False)


async def test_tenant_a_never_sees_tenant_b(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await stub.Store(cache_pb2.StoreRequest(key=key(tenant="tenant-b"), content="B's answer", usage=USAGE))
    miss = await stub.Lookup(cache_pb2.LookupRequest(key=key(tenant="tenant-a"), allow_stale=True))
    assert miss.tier == common_pb2.CACHE_TIER_MISS
    removed = await stub.Invalidate(cache_pb2.InvalidateRequest(tenant_id="tenant-a"))
    assert removed.removed_entries == 0
    hit = await stub.Lookup(cache_pb2.LookupRequest(key=key(tenant="tenant-b")))
    assert hit.tier == common_pb2.CACHE_TIER_EXACT and hit.content == "B's answer"


async def test_invalidate_by_prompt_version(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await stub.Store(cache_pb2.StoreRequest(key=key(prompt_version="v1"), content="one", usage=USAGE))
    await stub.Store(cache_pb2.StoreRequest(key=key(prompt_version="v2"), content="two", usage=USAGE))
    resp = await stub.Invalidate(cache_pb2.InvalidateRequest(tenant_id="acme", prompt_version="v1"))
    assert resp.removed_entries == 2  # its exact entry and its semantic one
    v1 = await stub.Lookup(cache_pb2.LookupRequest(key=key(prompt_version="v1")))
    v2 = await stub.Lookup(cache_pb2.LookupRequest(key=key(prompt_version="v2")))
    assert (v1.tier, v2.tier) == (common_pb2.CACHE_TIER_MISS, common_pb2.CACHE_TIER_EXACT)


async def test_oversized_content_is_not_stored(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    resp = await stub.Store(cache_pb2.StoreRequest(key=key(), content="x" * 1001, usage=USAGE))
    assert resp.entry_id == ""
    assert (await stub.Lookup(cache_pb2.LookupRequest(key=key()))).tier == common_pb2.CACHE_TIER_MISS


async def test_invalid_requests_get_field_violations(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    bad = cache_pb2.CacheKeyInput(
        namespace=cache_pb2.CacheNamespace(tenant_id="", prompt_version="v" * 200),
        messages=[common_pb2.ChatMessage(role=USER, content="hi"),
                  common_pb2.ChatMessage(role=7, content="x")],  # type: ignore[arg-type]  # an unknown role
        params=common_pb2.GenerationParams(temperature=3.0),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Store(cache_pb2.StoreRequest(key=bad, content="  ", ttl_seconds=10**8))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {
        "key.namespace.tenant_id", "key.namespace.prompt_version", "key.model", "key.messages[1].role",
        "key.params.temperature", "content", "ttl_seconds",
    }

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lookup(cache_pb2.LookupRequest(key=cache_pb2.CacheKeyInput(
            namespace=cache_pb2.CacheNamespace(tenant_id="acme"), model="gpt-x")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {"key.messages"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Invalidate(cache_pb2.InvalidateRequest(tenant_id=""))
    assert set(violations(err.value)) == {"tenant_id"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="t" * 129))
    assert set(violations(err.value)) == {"tenant_id"}

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lookup(cache_pb2.LookupRequest(key=key(tenant=" acme")))
    assert set(violations(err.value)) == {"key.namespace.tenant_id"}


async def test_redis_down_keeps_serving_and_reports_degraded(redis_prefix: str) -> None:
    async for stub, port in _serve("redis://127.0.0.1:1/0", redis_prefix):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        await stub.Store(cache_pb2.StoreRequest(key=key(), content="Paris.", usage=USAGE))
        hit = await stub.Lookup(cache_pb2.LookupRequest(key=key()))
        assert hit.tier == common_pb2.CACHE_TIER_EXACT and hit.content == "Paris."
        stats = await stub.GetStats(cache_pb2.GetStatsRequest())
        assert stats.degraded and "redis unreachable" in stats.degraded_detail
        assert (stats.stores, stats.exact_hits) == (1, 1)


def test_runs_as_a_process(redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    env = {"TOLLGATE_CACHE_PORT": str(port), "TOLLGATE_REDIS_URL": redis_url, "TOLLGATE_REDIS_PREFIX": redis_prefix,
           "TOLLGATE_CACHE_GRACE_PERIOD_S": "1",
           "TOLLGATE_CACHE_EMBEDDING_MODEL_DIR": str(static_model_dir().resolve())}
    proc = ServiceProcess("cache", port, env, tmp_path).wait_ready()
    try:
        with grpc.insecure_channel(proc.address) as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)
            stub.Store(cache_pb2.StoreRequest(key=key(), content="Paris.", usage=USAGE), timeout=5)
            hit = stub.Lookup(cache_pb2.LookupRequest(key=key()), timeout=5)
            assert hit.tier == common_pb2.CACHE_TIER_EXACT and hit.content == "Paris."
            near = stub.Lookup(cache_pb2.LookupRequest(key=key(text="What's the capital of France?")), timeout=5)
            assert near.tier == common_pb2.CACHE_TIER_SEMANTIC and near.content == "Paris."
    finally:
        assert proc.stop() == 0
    log = proc.log()
    assert "Paris" not in log and "capital" not in log  # never prompt or response text


PRICE = cache_pb2.TokenPrice(input_nano_usd_per_mtok=3_000_000_000, output_nano_usd_per_mtok=15_000_000_000)


async def test_semantic_hit_with_price_and_per_namespace_stats(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    await stub.Store(cache_pb2.StoreRequest(key=key(text="How do I reset my password?"), content="Use the link.",
                                            usage=USAGE))
    hit = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="How can I reset my password?"), price=PRICE))
    assert hit.tier == common_pb2.CACHE_TIER_SEMANTIC and hit.content == "Use the link."
    assert hit.entry_id.startswith("semantic:") and 0.5 < hit.similarity <= 1.0
    no_sem = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="How can I reset my password?"), exact_only=True))
    assert no_sem.tier == common_pb2.CACHE_TIER_MISS
    refused = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="How can I reset my password?"),
                                                        semantic_threshold=0.99999))
    assert refused.tier == common_pb2.CACHE_TIER_MISS
    other = await stub.Lookup(cache_pb2.LookupRequest(key=key(tenant="globex", text="How can I reset my password?")))
    assert other.tier == common_pb2.CACHE_TIER_MISS

    stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme", per_namespace=True))
    assert (stats.semantic_hits, stats.exact_hits, stats.misses, stats.stores) == (1, 0, 2, 1)
    assert stats.semantic_rejections >= 1
    # 20 input tokens (5 cached, billed at 0 here) at $3/M and 3 output at $15/M.
    assert stats.saved_nano_usd == (15 * 3_000 + 3 * 15_000)
    assert [n.namespace.prompt_version for n in stats.namespaces] == ["v1"]
    assert stats.namespaces[0].semantic_hits == 1 and stats.namespaces[0].saved_nano_usd == stats.saved_nano_usd

    removed = await stub.Invalidate(cache_pb2.InvalidateRequest(tenant_id="acme", prompt_version="v1"))
    assert removed.removed_entries == 2  # the exact entry and the semantic one
    gone = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="How can I reset my password?")))
    assert gone.tier == common_pb2.CACHE_TIER_MISS


async def test_semantic_request_fields_are_validated(stub: cache_pb2_grpc.CacheServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Lookup(cache_pb2.LookupRequest(key=key(), semantic_threshold=1.5,
                                                  price=cache_pb2.TokenPrice(input_nano_usd_per_mtok=-1)))
    assert set(violations(err.value)) == {"semantic_threshold", "price.input_nano_usd_per_mtok"}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetStats(cache_pb2.GetStatsRequest(per_namespace=True))
    assert set(violations(err.value)) == {"per_namespace"}


async def test_namespace_policy_sets_ttl_and_turns_semantic_off(redis_url: str, redis_prefix: str) -> None:
    from services.cache.settings import NamespacePolicy

    policies = {"acme": NamespacePolicy(semantic=False), "acme/slow": NamespacePolicy(ttl_s=5)}
    async for stub, _ in _serve(redis_url, redis_prefix, namespace_policies=policies):
        await stub.Store(cache_pb2.StoreRequest(key=key(text="How do I reset my password?"), content="x", usage=USAGE))
        miss = await stub.Lookup(cache_pb2.LookupRequest(key=key(text="How can I reset my password?")))
        assert miss.tier == common_pb2.CACHE_TIER_MISS
        await stub.Store(cache_pb2.StoreRequest(key=key(model_class="slow"), content="y", usage=USAGE))
        hit = await stub.Lookup(cache_pb2.LookupRequest(key=key(model_class="slow")))
        assert hit.tier == common_pb2.CACHE_TIER_EXACT
        stats = await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"))
        assert not stats.degraded


async def test_semantic_tier_without_a_model_reports_degraded(redis_url: str, redis_prefix: str,
                                                              tmp_path: Path) -> None:
    async for stub, _ in _serve(redis_url, redis_prefix, embedding_model_dir=str(tmp_path / "none")):
        await stub.Store(cache_pb2.StoreRequest(key=key(), content="Paris.", usage=USAGE))
        assert (await stub.Lookup(cache_pb2.LookupRequest(key=key()))).tier == common_pb2.CACHE_TIER_EXACT
        stats = await stub.GetStats(cache_pb2.GetStatsRequest())
        assert stats.degraded and "no embedding model" in stats.degraded_detail


async def test_the_semantic_store_keeps_at_most_its_bound_and_the_oldest_go_first(
        redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    """TOLLGATE_CACHE_SEMANTIC_MAX_ENTRIES bounds the vector store whatever the TTLs (issue 24)."""
    from libs.vector_store import EdgePointStore, ShardConfig
    from services.cache.embedding import StaticEmbedder

    bound, stores = 10, 30
    async for stub, _ in _serve(redis_url, redis_prefix, data_dir=str(tmp_path), semantic_max_entries=bound):
        for i in range(stores):
            # Longer TTLs for later writes: retained-until grows strictly with i, whatever the clock's resolution.
            await stub.Store(cache_pb2.StoreRequest(key=key(text=f"What does error code {i} of the printer mean?"),
                                                    content=f"Answer {i}.", usage=USAGE, ttl_seconds=100 + i))
        assert (await stub.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"))).stores == stores
    shard = EdgePointStore.open(tmp_path / "cache-vectors", ShardConfig(dim=StaticEmbedder(static_model_dir()).dim))
    try:
        records, _ = shard.shard.scroll(qe.ScrollRequest(limit=100, with_payload=True, with_vector=False))
    finally:
        shard.close()
    assert sorted(str((r.payload or {})["content"]) for r in records) == sorted(
        f"Answer {i}." for i in range(stores - bound, stores))
