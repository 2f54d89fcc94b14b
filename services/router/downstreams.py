"""gRPC implementations of the gateway's downstream Protocols (cache, ratelimit, inference)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf import duration_pb2
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.breaker import Breaker
from libs.chat import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationParams,
    Principal,
    TokenUsage,
    finish_from_proto,
    messages_to_proto,
    params_to_proto,
    usage_from_proto,
    usage_to_proto,
)
from libs.clients import Downstream
from libs.deadlines import Deadline
from services.router.gateway import CachedAnswer, CacheNamespace, Reservation

_TIERS = {common_pb2.CACHE_TIER_EXACT: "exact", common_pb2.CACHE_TIER_SEMANTIC: "semantic"}


def _cache_key(ns: CacheNamespace, model: str, messages: list[ChatMessage],
               params: GenerationParams) -> cache_pb2.CacheKeyInput:
    return cache_pb2.CacheKeyInput(
        namespace=cache_pb2.CacheNamespace(tenant_id=ns.tenant_id, model_class=ns.model_class,
                                           system_prompt_hash=ns.system_prompt_hash,
                                           prompt_version=ns.prompt_version),
        model=model, messages=messages_to_proto(messages), params=params_to_proto(params))


class GrpcCacheClient:
    def __init__(self, downstream: Downstream):
        self._ds = downstream
        self._stub = cache_pb2_grpc.CacheServiceStub(downstream.channel)

    async def lookup(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                     *, max_age_s: int, allow_stale: bool, exact_only: bool,
                     deadline: Deadline) -> CachedAnswer | None:
        resp = await self._ds.unary(self._stub.Lookup, cache_pb2.LookupRequest(
            key=_cache_key(ns, model, messages, params), exact_only=exact_only, max_age_seconds=max_age_s,
            allow_stale=allow_stale), deadline)
        tier = _TIERS.get(resp.tier)
        if tier is None:
            return None
        return CachedAnswer(resp.content, usage_from_proto(resp.usage), resp.model, tier, resp.stale)

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None:
        await self._ds.unary(self._stub.Store, cache_pb2.StoreRequest(
            key=_cache_key(ns, model, messages, params), content=content, usage=usage_to_proto(usage)), deadline)


class GrpcRateLimitClient:
    def __init__(self, downstream: Downstream, reservation_ttl_s: float = 0):
        self._ds = downstream
        self._stub = ratelimit_pb2_grpc.RateLimitServiceStub(downstream.channel)
        self._ttl = reservation_ttl_s

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        req = ratelimit_pb2.ReserveRequest(
            subject=ratelimit_pb2.Subject(
                principal=common_pb2.Principal(org_id=principal.org_id, team_id=principal.team_id,
                                               key_id=principal.key_id),
                client_ip=client_ip),
            request_id=request_id, estimated_tokens=estimated_tokens,
            estimated_cost_nano_usd=estimated_cost_nano_usd)
        if self._ttl:
            req.ttl.CopyFrom(duration_pb2.Duration(seconds=int(self._ttl)))
        resp = await self._ds.unary(self._stub.Reserve, req, deadline)
        return Reservation(resp.reservation_id, resp.advice == ratelimit_pb2.BUDGET_ADVICE_PREFER_CHEAPER,
                           resp.degraded)

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        await self._ds.unary(self._stub.Commit, ratelimit_pb2.CommitRequest(
            reservation_id=reservation_id, actual_tokens=actual_tokens,
            actual_cost_nano_usd=actual_cost_nano_usd), deadline)

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        await self._ds.unary(self._stub.Release, ratelimit_pb2.ReleaseRequest(reservation_id=reservation_id),
                             deadline)


class GrpcInferenceClient:
    """One Downstream (channel + breaker) per inference target, created on first use."""

    def __init__(self, *, margin_s: float, cap_s: float, fail_max: int, reset_timeout_s: float,
                 tracing: bool = False):
        self._margin = margin_s
        self._cap = cap_s
        self._fail_max = fail_max
        self._reset = reset_timeout_s
        self._tracing = tracing
        self._targets: dict[str, tuple[Downstream, inference_pb2_grpc.InferenceServiceStub]] = {}

    def _get(self, target: str) -> tuple[Downstream, inference_pb2_grpc.InferenceServiceStub]:
        found = self._targets.get(target)
        if found is None:
            ds = Downstream(f"inference@{target}", target, margin_s=self._margin, cap_s=self._cap,
                            breaker=Breaker(f"inference@{target}", fail_max=self._fail_max,
                                            reset_timeout_s=self._reset), tracing=self._tracing)
            found = (ds, inference_pb2_grpc.InferenceServiceStub(ds.channel))
            self._targets[target] = found
        return found

    def breaker(self, target: str) -> Breaker:
        return self._get(target)[0].breaker

    def is_open(self, target: str) -> bool:
        return self._get(target)[0].breaker.is_open

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        ds, stub = self._get(target)
        req = inference_pb2.GenerateRequest(request_id=request_id, model=model,
                                            messages=messages_to_proto(messages), params=params_to_proto(params))
        async for resp in ds.stream(stub.Generate, req, deadline):
            if resp.HasField("result"):
                r = resp.result
                yield GenerationChunk(usage=usage_from_proto(r.usage),
                                      finish_reason=finish_from_proto(r.finish_reason) or FinishReason.STOP,
                                      model=r.model, provider=r.provider)
            else:
                yield GenerationChunk(delta=resp.delta, output_tokens=resp.delta_output_tokens)

    async def aclose(self) -> None:
        for ds, _ in self._targets.values():
            await ds.close()
