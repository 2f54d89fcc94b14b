"""gRPC implementations of the gateway's downstream Protocols (cache, ratelimit, inference)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from tollgate.cache.v1 import cache_pb2, cache_pb2_grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

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
from libs.errors import Unavailable
from libs.rag_context import ContextChunk
from services.router import vocabulary as vocab
from services.router.control.pricing import Price
from services.router.pipeline.ports import CachedAnswer, CacheNamespace, Charge, Reservation


def _subject(principal: Principal, client_ip: str) -> ratelimit_pb2.Subject:
    return ratelimit_pb2.Subject(
        principal=common_pb2.Principal(org_id=principal.org_id, team_id=principal.team_id, key_id=principal.key_id),
        client_ip=client_ip)


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
                     *, max_age_s: int, allow_stale: bool, exact_only: bool, deadline: Deadline,
                     price: Price | None = None) -> CachedAnswer | None:
        req = cache_pb2.LookupRequest(key=_cache_key(ns, model, messages, params), exact_only=exact_only,
                                      max_age_seconds=max_age_s, allow_stale=allow_stale)
        if price is not None:
            # Lets the cache count the dollars its hits saved, per namespace.
            req.price.CopyFrom(cache_pb2.TokenPrice(
                input_nano_usd_per_mtok=price.input_per_mtok, output_nano_usd_per_mtok=price.output_per_mtok,
                cached_input_nano_usd_per_mtok=price.cached_input_per_mtok))
        resp = await self._ds.unary(self._stub.Lookup, req, deadline)
        tier = vocab.CACHE_TIER_FROM_PROTO.get(resp.tier)
        if tier is None:
            return None
        return CachedAnswer(resp.content, usage_from_proto(resp.usage), resp.model, tier, resp.stale)

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None:
        await self._ds.unary(self._stub.Store, cache_pb2.StoreRequest(
            key=_cache_key(ns, model, messages, params), content=content, usage=usage_to_proto(usage)), deadline)


class GrpcRetrievalClient:
    def __init__(self, downstream: Downstream):
        self._ds = downstream
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(downstream.channel)

    async def search(self, tenant_id: str, query: str, top_k: int, deadline: Deadline) -> list[ContextChunk]:
        resp = await self._ds.unary(self._stub.Search, retrieval_pb2.SearchRequest(
            tenant_id=tenant_id, query=query, top_k=top_k, mode=retrieval_pb2.SEARCH_MODE_HYBRID), deadline)
        return [ContextChunk(h.chunk_id, h.document_id, h.text, h.score) for h in resp.hits]


class GrpcRateLimitClient:
    def __init__(self, downstream: Downstream, reservation_ttl_s: float = 0):
        self._ds = downstream
        self._stub = ratelimit_pb2_grpc.RateLimitServiceStub(downstream.channel)
        self._ttl = reservation_ttl_s

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        req = ratelimit_pb2.ReserveRequest(
            subject=_subject(principal, client_ip), request_id=request_id, estimated_tokens=estimated_tokens,
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

    async def charge(self, charge: Charge, deadline: Deadline) -> None:
        used_at = timestamp_pb2.Timestamp()
        used_at.FromNanoseconds(int(charge.at * 1e9))
        await self._ds.unary(self._stub.Charge, ratelimit_pb2.ChargeRequest(
            subject=_subject(charge.principal, charge.client_ip), charge_id=charge.request_id,
            requests=charge.requests, tokens=charge.tokens, cost_nano_usd=charge.cost_nano_usd,
            used_at=used_at), deadline)


class _Replica:
    """One inference target: channel + breaker, and what we know of its load."""

    def __init__(self, ds: Downstream):
        self.ds = ds
        self.stub = inference_pb2_grpc.InferenceServiceStub(ds.channel)
        self.polled_load = 0  # running + waiting, from its last GetLoad
        self.waiting = 0
        self.max_waiting = 0  # the queue bound past which it refuses work (0: unknown)
        self.in_flight = 0  # generations this router has open on it right now
        # Monotonic time before which it gets no traffic: its provider said "retry after" (a 429).
        self.cool_until = 0.0
        self.poller: asyncio.Task[None] | None = None
        self.reachable = True  # its last load poll was answered

    @property
    def score(self) -> int:
        # The replica's own count covers every router; ours reacts within a request, between polls.
        return max(self.polled_load, self.in_flight)

    @property
    def pressure(self) -> float:
        """How full its queue is (1.0: it refuses new work)."""
        return self.waiting / self.max_waiting if self.max_waiting else 0.0


class GrpcInferenceClient:
    """Inference targets (replicas) with a breaker each, ordered by load for every request.

    A background poller per replica reads GetLoad every ``load_poll_s``; the router
    prefers the least busy healthy replica, so several replicas of one model share
    the traffic by how much work each has, not round robin.
    """

    def __init__(self, *, margin_s: float, cap_s: float, fail_max: int, reset_timeout_s: float,
                 error_rate: float = 0.5, window_s: float = 10.0, min_calls: int = 10,
                 load_poll_s: float = 0.25, tracing: bool = False, timeout_trip: int = 3):
        self._margin = margin_s
        self._cap = cap_s
        self._fail_max = fail_max
        self._reset = reset_timeout_s
        self._error_rate = error_rate
        self._window_s = window_s
        self._min_calls = min_calls
        self._timeout_trip = timeout_trip
        self._poll_s = load_poll_s
        self._tracing = tracing
        self._replicas: dict[str, _Replica] = {}

    def _get(self, target: str) -> _Replica:
        replica = self._replicas.get(target)
        if replica is None:
            ds = Downstream(f"inference@{target}", target, margin_s=self._margin, cap_s=self._cap,
                            breaker=Breaker(f"inference@{target}", fail_max=self._fail_max,
                                            reset_timeout_s=self._reset, error_rate=self._error_rate,
                                            window_s=self._window_s, min_calls=self._min_calls,
                                            timeout_trip=self._timeout_trip),
                            tracing=self._tracing)
            replica = self._replicas[target] = _Replica(ds)
            replica.poller = asyncio.get_running_loop().create_task(self._poll(replica), name=f"load@{target}")
        return replica

    async def _poll(self, replica: _Replica) -> None:
        while True:
            try:
                load = await replica.stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=max(self._poll_s, 0.1))
                replica.polled_load = load.running_requests + load.waiting_requests
                replica.waiting, replica.max_waiting = load.waiting_requests, load.max_waiting_requests
                if not replica.reachable:
                    # Unreachable until now and answering again (a restarted replica): probe it now, not after the
                    # breaker's reset timeout. Only then: a replica that answers polls but fails generations (its
                    # provider returns 500s) is left to the reset timeout, or every poll would cost a request.
                    replica.reachable = True
                    replica.ds.breaker.probe_now()
            except grpc.aio.AioRpcError:
                replica.reachable = False  # its breaker decides whether it gets traffic
            await asyncio.sleep(self._poll_s)

    def breaker(self, target: str) -> Breaker:
        return self._get(target).ds.breaker

    def order(self, targets: Sequence[str]) -> list[str]:
        """Replicas whose breaker lets a call through and that are not cooling down after a 429,
        least busy first (ties keep the given order)."""
        now = time.monotonic()
        live = [t for t in targets if not self._get(t).ds.breaker.is_open and self._get(t).cool_until <= now]
        return sorted(live, key=lambda t: self._get(t).score)

    def cool_down(self, target: str, seconds: float) -> None:
        """Honour a provider's retry-after: no traffic to this replica for ``seconds`` (not a breaker failure)."""
        replica = self._get(target)
        replica.cool_until = max(replica.cool_until, time.monotonic() + seconds)

    def record_fault(self, target: str, exc: Unavailable) -> None:
        """A fault the request path detected itself (no first token in time, a stall): counts against the
        replica's breaker like one its call raised."""
        self._get(target).ds.breaker.record_fault(exc)

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        """Seconds until the first of these cooling replicas takes traffic again (None: none is cooling)."""
        now = time.monotonic()
        waits = [self._get(t).cool_until - now for t in targets if self._get(t).cool_until > now]
        return min(waits) if waits else None

    def pressure(self) -> float:
        """Inference pressure for load shedding: the least loaded healthy replica's queue fill (0 when none
        has reported yet)."""
        live = [r for r in self._replicas.values() if not r.ds.breaker.is_open]
        return min((r.pressure for r in live), default=0.0)

    def load(self, target: str) -> int:
        return self._get(target).score

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        replica = self._get(target)
        req = inference_pb2.GenerateRequest(request_id=request_id, model=model,
                                            messages=messages_to_proto(messages), params=params_to_proto(params))
        replica.in_flight += 1
        try:
            async for resp in replica.ds.stream(replica.stub.Generate, req, deadline):
                if resp.HasField("result"):
                    r = resp.result
                    yield GenerationChunk(usage=usage_from_proto(r.usage),
                                          finish_reason=finish_from_proto(r.finish_reason) or FinishReason.STOP,
                                          model=r.model, provider=r.provider)
                else:
                    yield GenerationChunk(delta=resp.delta, output_tokens=resp.delta_output_tokens)
        finally:
            replica.in_flight -= 1

    async def aclose(self) -> None:
        for replica in self._replicas.values():
            if replica.poller is not None:
                replica.poller.cancel()
            await replica.ds.close()
