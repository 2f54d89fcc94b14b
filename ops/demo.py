"""``make demo``: a scripted tour of the gateway over real gRPC — a miss, an exact hit,
an over-limit request and a bad key — printing what each cost, saved and returned."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf import timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from libs.grpc_errors import domain_error_from_rpc
from ops import enums


def _tier(tier: int) -> str:
    """``miss``, ``exact hit``, ``semantic hit``."""
    if tier in (common_pb2.CACHE_TIER_UNSPECIFIED, common_pb2.CACHE_TIER_MISS):
        return "?" if tier == common_pb2.CACHE_TIER_UNSPECIFIED else "miss"
    return f"{enums.label(common_pb2.CacheTier, tier)} hit"


def _usd(nano: int) -> str:
    return f"${nano / 1e9:.9f}"


def _request(model: str, question: str, max_tokens: int = 64) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
        model=model,
        messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=question)],
        params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=max_tokens)))


async def run_demo(router_address: str, admin_key: str, model: str) -> int:
    async with grpc.aio.insecure_channel(router_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        router = router_pb2_grpc.RouterServiceStub(channel)
        admin_md = (("authorization", f"Bearer {admin_key}"),)
        keys = await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=admin_md)
        principal = keys.keys[0].principal
        created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=principal.org_id, team_id=principal.team_id, name="demo-member",
            role=admin_pb2.KEY_ROLE_MEMBER), metadata=admin_md)
        await admin.SetLimits(admin_pb2.SetLimitsRequest(
            scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, requests_per_minute=60,
            tokens_per_minute=2_000), metadata=admin_md)
        await asyncio.sleep(2.5)  # the limiter picks up limit changes within seconds
        md = (("authorization", f"Bearer {created.key}"),)
        print(f"\nA member key ({created.key_id}) limited to 2,000 tokens/minute.\n")

        question = "What does a cost-aware LLM gateway do?"
        steps: list[tuple[str, router_pb2.GenerateRequest, tuple[tuple[str, str], ...]]] = [
            ("1. a question (cache miss)", _request(model, question), md),
            ("2. the same question again (exact cache hit)", _request(model, question), md),
            ("3. a request whose reservation exceeds the limit", _request(model, "Write an essay.", 4_000), md),
            ("4. a bad key", _request(model, question), (("authorization", "Bearer tg-not-a-real-key"),)),
        ]
        total_cost = total_saved = 0
        for title, req, metadata in steps:
            print(title)
            t0 = time.perf_counter()
            try:
                resp = await router.Generate(req, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as err:
                domain = domain_error_from_rpc(err)
                print(f"   -> {err.code().name}: {err.details()}")
                if domain.reason:
                    print(f"      reason {domain.reason}, retry after "
                          f"{getattr(domain, 'retry_after_s', None)}, "
                          f"violations {[v.subject for v in getattr(domain, 'violations', [])]}")
                continue
            s = resp.summary
            total_cost += s.cost_nano_usd
            total_saved += s.saved_nano_usd
            print(f"   -> {_tier(s.cache_tier)} via {s.model}/{s.provider or '-'} in "
                  f"{(time.perf_counter() - t0) * 1000:.1f} ms; tokens in {s.usage.input_tokens} "
                  f"out {s.usage.output_tokens}; cost {_usd(s.cost_nano_usd)}, saved {_usd(s.saved_nano_usd)}")
            print(f"      answer: {resp.content[:100]!r}")

        await asyncio.sleep(2.0)  # let the ledger writer move the usage events into PostgreSQL
        start = timestamp_pb2.Timestamp(seconds=int(time.time()) - 3600)
        end = timestamp_pb2.Timestamp(seconds=int(time.time()) + 60)
        report = await admin.GetUsageReport(admin_pb2.GetUsageReportRequest(
            start_time=start, end_time=end, group_by=[admin_pb2.USAGE_GROUP_BY_KEY]), metadata=admin_md)
        print(f"\nTotal charged {_usd(total_cost)}, saved by the cache {_usd(total_saved)}.")
        print("Usage ledger (PostgreSQL), by key:")
        for row in report.rows:
            print(f"   {row.group_values[0]}: {row.requests} requests, {row.cache_hits} cache hits, "
                  f"cost {_usd(row.cost_nano_usd)}, saved {_usd(row.saved_nano_usd)}")
    return 0
