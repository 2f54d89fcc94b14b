"""The request path, free of gRPC: ``Gateway.generate`` runs the stages in the order a request meets them.

The servicer authenticates the caller (stage 1, ``authenticate.py``) and decodes the command; then:
route (2) → retrieve (3) → look up the cache (4, with admission's reservation already in flight) →
admit (5) → generate (6) → account (7). ``generate`` yields text deltas and then one :class:`Summary`;
unary and streaming RPCs both consume it. Downstream services sit behind the Protocols in ``ports.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import replace

from libs.chat import FinishReason, system_prompt_hash
from libs.deadlines import Deadline
from libs.errors import QuotaExceeded, Unavailable
from services.router.control.keys import KeyRecord
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.account import AccountStage
from services.router.pipeline.admit import AdmitStage, is_budget_exhausted
from services.router.pipeline.degradation import DegradationController, Level
from services.router.pipeline.failover import RetryPolicy
from services.router.pipeline.generate import GenerateStage
from services.router.pipeline.hedging import Hedger
from services.router.pipeline.local_charges import LocalCharges
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.lookup import LookupStage
from services.router.pipeline.ports import (
    AutoRouter,
    CacheClient,
    CachedAnswer,
    CacheNamespace,
    ExperimentAssigner,
    InferenceClient,
    RateLimitClient,
    RetrievalClient,
    UsageSink,
)
from services.router.pipeline.request import GenerateCommand, RequestState, Summary
from services.router.pipeline.retrieve import RetrieveStage
from services.router.pipeline.route import RouteStage
from services.router.pipeline.shedding import LoadShedder, effective_tier

# Retry-After of "no backend can serve this model": a killed replica is restarted within about a second, and
# its breaker lets a probe through as soon as it answers its load poll.
NO_BACKEND_RETRY_AFTER_S = 1.0


class Gateway:
    def __init__(self, *, registry: Registry, cache: CacheClient, ratelimit: RateLimitClient,
                 inference: InferenceClient, usage: UsageSink, default_max_output_tokens: int,
                 side_call_timeout_s: float, retrieval: RetrievalClient | None = None,
                 retrieval_timeout_s: float = 0.5, retry: RetryPolicy = RetryPolicy(),
                 degradation: DegradationController | None = None, shedder: LoadShedder | None = None,
                 auto_router: AutoRouter | None = None, experiments: ExperimentAssigner | None = None,
                 local_limits: LocalLimiter | None = None, hedger: Hedger | None = None,
                 local_charges: LocalCharges | None = None):
        self._registry = registry
        self._route = RouteStage(registry, auto_router, experiments)
        self._retrieve = RetrieveStage(retrieval, retrieval_timeout_s)
        self._lookup = LookupStage(cache, registry, side_call_timeout_s)
        self._admit = AdmitStage(ratelimit, default_max_output_tokens=default_max_output_tokens,
                                 side_timeout_s=side_call_timeout_s, degradation=degradation, shedder=shedder,
                                 local=local_limits, charges=local_charges)
        self._generate = GenerateStage(inference, registry, self._route, self._admit, retry=retry,
                                       default_max_output_tokens=default_max_output_tokens, hedger=hedger)
        self._account = AccountStage(ratelimit, cache, usage, local_limits, local_charges)
        self._charges = local_charges

    def resolve_chain(self, key: KeyRecord, cmd: GenerateCommand) -> list[ModelEntry]:
        return self._route.resolve_chain(key, cmd)

    def available_models(self, key: KeyRecord) -> list[ModelEntry]:
        return self._route.available_models(key)

    async def generate(self, key: KeyRecord, cmd: GenerateCommand, deadline: Deadline,
                       request_id: str | None = None) -> AsyncGenerator[str | Summary, None]:
        state = RequestState.begin(key, cmd, request_id)
        chain = self._route.resolve_chain(key, cmd, state)
        state.use_model(chain[0], self._registry)
        state.level = self._admit.level()
        try:
            async with aclosing(self._serve(state, chain, deadline)) as answer:
                async for item in answer:
                    yield item
        except BaseException as exc:
            state.end_with(exc)
            raise
        finally:
            self._account.settle_later(state)

    async def _serve(self, state: RequestState, chain: list[ModelEntry],
                     deadline: Deadline) -> AsyncGenerator[str | Summary, None]:
        if state.cmd.retrieval.enabled:
            state.cmd = await self._retrieve.augment(state, deadline)
        cmd = state.cmd
        ns = CacheNamespace(state.key.principal.org_id, chain[0].name, system_prompt_hash(cmd.messages),
                            cmd.prompt_version)
        tier = effective_tier(state.key.tier, cmd.priority)
        hit = await self._look_up_while_reserving(state, ns, chain[0], tier, deadline)
        if hit is None:
            if state.level == Level.CACHE_ONLY:
                self._admit.require_probe()
            with self._admit.shed(tier):
                hit = await self._admit_or_cached(state, ns, chain[0], deadline)
                if hit is None:
                    chain = self._route.after_admission(state, chain, self._admit)
                    ns = replace(ns, model_class=chain[0].name)
                    async with aclosing(self._generate.through_chain(state, chain, deadline)) as deltas:
                        async for delta in deltas:
                            yield delta
            if hit is None and state.finish is None:
                hit = await self._fallback_hit(state, ns, chain[0], deadline)
        if hit is not None:
            yield hit.content
        elif cmd.cacheable and not cmd.cache.no_store and state.finish in (FinishReason.STOP, FinishReason.LENGTH):
            state.store_ns = ns
        yield self._account.summary(state)

    async def _look_up_while_reserving(self, state: RequestState, ns: CacheNamespace, model: ModelEntry, tier: str,
                                       deadline: Deadline) -> CachedAnswer | None:
        """The cache lookup and, concurrently, the reservation, so a miss pays one round trip, not two. In
        cache-only mode a stale answer is better than none."""
        looking_up = state.cmd.cacheable and not state.cmd.cache.no_cache
        lookup = (asyncio.ensure_future(self._lookup.first_lookup(state, ns, model, deadline,
                                                                  allow_stale=state.level == Level.CACHE_ONLY))
                  if looking_up else None)
        if self._admit.may_reserve_early(state, tier, hit_rate=self._lookup.hit_rate, looking_up=looking_up):
            self._admit.start_reservation(state, deadline)
        hit = await lookup if lookup is not None else None
        if hit is not None:
            self._lookup.serve_hit(state, hit)
        return hit

    async def _admit_or_cached(self, state: RequestState, ns: CacheNamespace, model: ModelEntry,
                               deadline: Deadline) -> CachedAnswer | None:
        """Admit the request (the budget check); None when admitted. A budget at 100 % still lets the tenant
        read what it already paid for: any cached answer, stale included."""
        try:
            await self._admit.reserve(state, deadline)
        except QuotaExceeded as exc:
            if not is_budget_exhausted(exc) or state.cmd.cache.no_cache:
                raise
            hit = await self._lookup.lookup(state, ns, model, deadline, allow_stale=True)
            if hit is None:
                raise
            self._lookup.serve_hit(state, hit)
            state.degrade("budget", "budget exhausted: served from cache")
            return hit
        return None

    async def _fallback_hit(self, state: RequestState, ns: CacheNamespace, model: ModelEntry,
                            deadline: Deadline) -> CachedAnswer:
        """Every backend failed: any cached answer, stale included, or UNAVAILABLE."""
        hit = (None if state.cmd.cache.no_cache
               else await self._lookup.lookup(state, ns, model, deadline, allow_stale=True))
        if hit is None:
            raise Unavailable(f"no backend can serve {model.name!r} right now and no cached answer "
                              f"exists ({state.attempts} attempts); retry shortly", reason="NO_BACKEND",
                              retry_after_s=NO_BACKEND_RETRY_AFTER_S)
        self._lookup.serve_hit(state, hit)
        state.degrade("no_backend", "every backend failed: served from cache")
        return hit

    async def aclose(self) -> None:
        """Wait for in-flight settlements (shutdown must not lose usage), then try once more to deliver the
        charges for local admissions."""
        await self._account.aclose()
        if self._charges is not None:
            await self._charges.aclose()
