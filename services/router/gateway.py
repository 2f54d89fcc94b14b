"""The request path (DESIGN.md steps 1-10), free of gRPC.

``Gateway.generate`` yields text deltas and then one :class:`Summary`. Downstream
services sit behind the Protocols below; ``services/router/downstreams.py``
implements them over gRPC, tests can use real services or in-process ones.

Settlement (commit the reservation, store the answer, record usage) runs in a
tracked background task so it happens exactly once on every exit path (done,
error, client cancel) without holding up the response; ``aclose`` drains it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Protocol

from libs.breaker import is_backend_fault
from libs.chat import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationParams,
    Principal,
    Role,
    TokenUsage,
    system_prompt_hash,
)
from libs.deadlines import Deadline
from libs.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    TollgateError,
    Unavailable,
    Violations,
)
from libs.rag_context import ContextChunk, RetrievedContext, assemble_context, cited_chunk_ids
from libs.tokens import estimate_prompt_tokens, estimate_tokens
from services.router.complexity import RouteDecision
from services.router.degradation import DegradationController, Level
from services.router.experiments import Experiment, Variant, variant_label
from services.router.failover import (
    CONTEXT_WINDOW_EXCEEDED,
    RetryPolicy,
    fitting,
    is_context_overflow,
    is_retryable,
    larger_window,
    retry_after,
)
from services.router.keys import KeyRecord
from services.router.pricing import FREE, Price
from services.router.registry import ModelEntry, Registry
from services.router.shedding import LoadShedder, effective_tier
from services.router.usage import UsageEvent, utcnow

log = logging.getLogger(__name__)

AUTO_MODEL = "auto"
# ErrorInfo.reason the ratelimit service gives a reserve refused by a USD budget.
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
MAX_QUERY_CHARS = 4096
# Reserve concurrently with the cache lookup while fewer than this share of lookups hit.
SPECULATE_BELOW_HIT_RATE = 0.5
HIT_RATE_ALPHA = 0.05


# --- what the router asks of its downstreams ----------------------------------------

@dataclass(frozen=True)
class CacheNamespace:
    tenant_id: str
    model_class: str
    system_prompt_hash: str
    prompt_version: str


@dataclass(frozen=True)
class CachedAnswer:
    content: str
    usage: TokenUsage
    model: str
    tier: str  # "exact" | "semantic"
    stale: bool


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    prefer_cheaper: bool
    degraded: bool


class CacheClient(Protocol):
    async def lookup(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                     *, max_age_s: int, allow_stale: bool, exact_only: bool, deadline: Deadline,
                     price: Price | None = None) -> CachedAnswer | None: ...

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None: ...


class RateLimitClient(Protocol):
    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation: ...

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None: ...

    async def release(self, reservation_id: str, deadline: Deadline) -> None: ...


class RetrievalClient(Protocol):
    async def search(self, tenant_id: str, query: str, top_k: int, deadline: Deadline) -> list[ContextChunk]: ...


class UsageSink(Protocol):
    async def record(self, event: UsageEvent) -> None: ...


class AutoRouter(Protocol):
    """The complexity router behind model "auto" (services/router/complexity.py)."""

    def decide(self, messages: Sequence[ChatMessage]) -> RouteDecision: ...


class ExperimentAssigner(Protocol):
    """Active A/B experiments (services/router/experiments.py: ExperimentBook)."""

    def for_request(self, model_name: str, user_id: str) -> tuple[Experiment, Variant] | None: ...


class InferenceClient(Protocol):
    def order(self, targets: Sequence[str]) -> list[str]:
        """The replicas to try, healthy and least busy first."""
        ...

    def cool_down(self, target: str, seconds: float) -> None:
        """No traffic to ``target`` for ``seconds`` (its provider asked us to retry after)."""
        ...

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        """Seconds until the first cooling one of ``targets`` takes traffic again (None: none is cooling)."""
        ...

    def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                 params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]: ...


# --- the request ---------------------------------------------------------------------

@dataclass(frozen=True)
class CachePolicy:
    no_cache: bool = False
    no_store: bool = False
    no_semantic: bool = False
    max_age_s: int = 0
    allow_nondeterministic: bool = False


@dataclass(frozen=True)
class RetrievalPolicy:
    enabled: bool = False
    # Fail with UNAVAILABLE when retrieval is down, instead of answering without context.
    required: bool = False
    top_k: int = 8
    max_context_tokens: int = 2000


@dataclass(frozen=True)
class GenerateCommand:
    model: str
    messages: list[ChatMessage]
    params: GenerationParams
    fallback_models: tuple[str, ...] = ()
    cache: CachePolicy = CachePolicy()
    user_id: str = ""
    prompt_version: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    client_ip: str = ""
    retrieval: RetrievalPolicy = RetrievalPolicy()
    # "low" | "normal" | "high": may lower the key's tier for shedding, never raise it.
    priority: str = "normal"


@dataclass
class Summary:
    request_id: str
    model: str
    provider: str
    usage: TokenUsage
    cost_nano_usd: int
    saved_nano_usd: int
    cache_tier: str  # "miss" | "exact" | "semantic"
    degraded_reasons: list[str]
    finish_reason: FinishReason
    latency_s: float
    price_version: int
    cited_chunk_ids: list[str] = field(default_factory=list)
    degradation_level: str = "full"  # "full" | "reduced" | "cache_only"
    degraded_detail: str = ""
    route_reason: str = ""
    attempts: int = 0
    variant: str = ""

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)


@dataclass
class _Attempt:
    """Mutable state of one request, read by settlement whatever way the request ends."""

    request_id: str
    key: KeyRecord
    cmd: GenerateCommand
    started_at: datetime
    t0: float
    model: ModelEntry | None = None
    provider: str = ""
    price: Price = FREE
    reservation: Reservation | None = None
    text: list[str] = field(default_factory=list)
    # Output tokens the engine reported delta by delta (vLLM); 0 when it does not say.
    counted_output_tokens: int = 0
    usage: TokenUsage | None = None
    finish: FinishReason | None = None
    cache_tier: str = "miss"
    saved_nano_usd: int = 0
    degraded: list[str] = field(default_factory=list)
    status: str = "ok"
    error_reason: str = ""
    store_ns: CacheNamespace | None = None
    context: RetrievedContext | None = None
    level: Level = Level.FULL
    # The reservation call, running concurrently with the cache lookup.
    reserving: asyncio.Future[None] | None = None
    degraded_detail: list[str] = field(default_factory=list)
    route_reason: str = ""
    attempts: int = 0
    variant: str = ""

    def add_route_reason(self, reason: str) -> None:
        self.route_reason = f"{self.route_reason}; {reason}" if self.route_reason else reason

    def degrade(self, reason: str, detail: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
        if detail and detail not in self.degraded_detail:
            self.degraded_detail.append(detail)

    def billed_usage(self) -> TokenUsage:
        if self.usage is not None:
            return self.usage
        if not self.text:
            return TokenUsage()  # nothing was generated: nothing to bill
        # Cut off before the engine reported usage: bill what was sent and generated, with the engine's
        # own per-delta token counts when it gave them, else an estimate from the text.
        generated = self.counted_output_tokens or sum(estimate_tokens(t) for t in self.text)
        return TokenUsage(estimate_prompt_tokens(m.content for m in self.cmd.messages), generated, 0)


class Gateway:
    def __init__(self, *, registry: Registry, cache: CacheClient, ratelimit: RateLimitClient,
                 inference: InferenceClient, usage: UsageSink, default_max_output_tokens: int,
                 side_call_timeout_s: float, retrieval: RetrievalClient | None = None,
                 retrieval_timeout_s: float = 2.0, retry: RetryPolicy = RetryPolicy(),
                 degradation: DegradationController | None = None, shedder: LoadShedder | None = None,
                 auto_router: AutoRouter | None = None, experiments: ExperimentAssigner | None = None):
        self._registry = registry
        self._cache = cache
        self._ratelimit = ratelimit
        self._inference = inference
        self._usage = usage
        self._default_max_output = default_max_output_tokens
        self._side_timeout = side_call_timeout_s
        self._retrieval = retrieval
        self._retrieval_timeout = retrieval_timeout_s
        self._retry = retry
        self._degradation = degradation
        self._shedder = shedder
        self._auto_router = auto_router
        self._experiments = experiments
        self._pending: set[asyncio.Task[None]] = set()
        # Moving average of cache hits among lookups: decides whether to reserve before the lookup answers.
        self._hit_rate = 0.0

    # --- step 3: the model chain ---------------------------------------------------

    def resolve_chain(self, key: KeyRecord, cmd: GenerateCommand, attempt: _Attempt | None = None) -> list[ModelEntry]:
        """The models to try, in order: the requested one (or the auto router's / an experiment's choice),
        then the fallbacks. Records why on ``attempt``."""
        v = Violations()
        names = [cmd.model, *cmd.fallback_models]
        chain: list[ModelEntry] = []
        reason = ""
        for i, name in enumerate(names):
            path = "input.model" if i == 0 else f"input.fallback_models[{i - 1}]"
            if name == AUTO_MODEL and i == 0:
                picks, reason = self._auto_models(key, cmd.messages)
                if not picks:
                    v.add(path, "no registered model is available to this key for 'auto'")
                    continue
                chain.extend(picks)
                continue
            found = self._registry.model(name)
            if found is None:
                v.add(path, f"unknown model {name!r}")
                continue
            if not key.may_use(found.name):
                raise PermissionDenied(f"this key may not use model {found.name!r}")
            if found not in chain:
                chain.append(found)
        v.raise_if_any()
        if self._experiments is not None and attempt is not None:
            assigned = self._experiments.for_request(cmd.model, cmd.user_id or key.key_id)
            if assigned is not None:
                experiment, variant = assigned
                label = variant_label(experiment, variant)
                if variant.model == AUTO_MODEL:
                    picks, auto_reason = self._auto_models(key, cmd.messages)
                else:
                    entry = self._registry.model(variant.model)
                    picks, auto_reason = ([entry] if entry is not None and key.may_use(entry.name) else []), ""
                # A variant this key may not use (or one no longer registered) leaves the request out of it.
                if picks:
                    chain = [*picks, *(m for m in chain if m not in picks)]
                    attempt.variant = label
                    reason = f"experiment {label}" + (f" ({auto_reason})" if auto_reason else "")
        if attempt is not None:
            attempt.route_reason = reason
        return chain

    def available_models(self, key: KeyRecord) -> list[ModelEntry]:
        """The registered models this key may ask for, by name."""
        return [m for m in self._registry.models() if key.may_use(m.name)]

    def _cheaper_chain(self, key: KeyRecord, chain: list[ModelEntry]) -> list[ModelEntry]:
        """The chain with the cheapest cheap-tier model this key may use in front (unchanged if the
        chain already starts on the cheap tier or the key may use none)."""
        if chain[0].cost_tier == "cheap":
            return chain
        cheap = self._by_price([m for m in self._registry.models() if m.cost_tier == "cheap" and key.may_use(m.name)])
        if not cheap:
            return chain
        return [cheap[0], *(m for m in chain if m != cheap[0])]

    def _by_price(self, models: list[ModelEntry]) -> list[ModelEntry]:
        """Cheapest first (input + output price now; unpriced models last), then by name."""
        now = utcnow()

        def rank(m: ModelEntry) -> tuple[int, int, str]:
            price = self._registry.price(m.name, now)
            return (price is None, price.input_per_mtok + price.output_per_mtok if price else 0, m.name)

        return sorted(models, key=rank)

    def _auto_models(self, key: KeyRecord, messages: Sequence[ChatMessage]) -> tuple[list[ModelEntry], str]:
        """For "auto": the cheapest model of the tier the complexity router picks, then the cheapest of the
        other tier as its fallback."""
        usable = [m for m in self._registry.models() if key.may_use(m.name)]
        if self._auto_router is None:
            tier, reason = "cheap", "auto: cheap tier (no complexity router loaded)"
        else:
            decision = self._auto_router.decide(messages)
            tier, reason = decision.tier, f"auto: {decision.tier} tier, {decision.reason}"
        first = self._by_price([m for m in usable if m.cost_tier == tier])
        other = self._by_price([m for m in usable if m.cost_tier != tier])
        return [*first[:1], *other[:1]], reason

    # --- the request path ------------------------------------------------------------

    async def generate(self, key: KeyRecord, cmd: GenerateCommand, deadline: Deadline,
                       request_id: str | None = None) -> AsyncIterator[str | Summary]:
        attempt = _Attempt(request_id or uuid.uuid4().hex, key, cmd, utcnow(), time.monotonic())
        chain = self.resolve_chain(key, cmd, attempt)
        attempt.model = chain[0]
        attempt.price = self._price(chain[0], attempt.started_at)
        cacheable = cmd.params.deterministic or cmd.cache.allow_nondeterministic
        level = attempt.level = self._degradation.evaluate() if self._degradation else Level.FULL
        try:
            if cmd.retrieval.enabled:
                # Step 5 before step 4: the retrieved context is part of the prompt, so of the cache key too.
                cmd = attempt.cmd = await self._augment(attempt, deadline)
            ns = CacheNamespace(key.principal.org_id, chain[0].name, system_prompt_hash(cmd.messages),
                                cmd.prompt_version)
            tier = effective_tier(key.tier, cmd.priority)
            # Steps 4 and 6 at once: the cache lookup (fail open; in cache-only mode a stale answer is better
            # than none) and the reservation run concurrently, so a miss pays one round trip, not two. A hit
            # then releases the reservation in settlement: two wasted calls, so this speculation runs only
            # while most lookups miss (a moving average of the hit rate). No reservation when the request
            # could not go on anyway: shed by priority, or cache-only (where only a miss may become the probe).
            lookup = (asyncio.ensure_future(self._lookup(attempt, ns, chain[0], cmd, deadline,
                                                         allow_stale=level == Level.CACHE_ONLY))
                      if cacheable and not cmd.cache.no_cache else None)
            speculate = lookup is None or self._hit_rate < SPECULATE_BELOW_HIT_RATE
            if (level != Level.CACHE_ONLY and speculate
                    and (self._shedder is None or self._shedder.would_admit(tier))):
                attempt.reserving = asyncio.ensure_future(self._reserve(attempt, deadline))
            hit = await lookup if lookup is not None else None
            if lookup is not None:
                self._hit_rate += HIT_RATE_ALPHA * ((hit is not None) - self._hit_rate)
            if hit is not None:
                self._serve_hit(attempt, hit)
                yield hit.content
                yield self._summary(attempt)
                return
            if level == Level.CACHE_ONLY:
                assert self._degradation is not None
                if not self._degradation.allow_probe():
                    raise Unavailable(
                        f"the gateway is serving cached answers only ({self._degradation.reason}) and has none "
                        "for this request; retry shortly", reason="CACHE_ONLY",
                        retry_after_s=self._degradation.retry_after_s)
                # This miss is the interval's probe: the backends' answer tells the controller whether they are back.
            # Priority shedding (after the cache: a hit costs no backend capacity).
            with self._shedder.admit(tier) if self._shedder else nullcontext():
                # Step 6: the reservation (started above unless the shedder refused before the lookup).
                try:
                    await (attempt.reserving or self._reserve(attempt, deadline))
                except QuotaExceeded as exc:
                    if exc.reason != BUDGET_EXHAUSTED or cmd.cache.no_cache:
                        raise
                    # A budget at 100 % still lets the tenant read what it already paid for: any cached
                    # answer, stale included; otherwise the ratelimit service's error goes back as is
                    # (RESOURCE_EXHAUSTED, QuotaFailure naming the level, RetryInfo = window reset).
                    hit = await self._lookup(attempt, ns, chain[0], cmd, deadline, allow_stale=True)
                    if hit is None:
                        raise
                    self._serve_hit(attempt, hit)
                    attempt.degrade("budget", "budget exhausted: served from cache")
                    yield hit.content
                    yield self._summary(attempt)
                    return
                if attempt.reservation is not None and attempt.reservation.prefer_cheaper:
                    # >= 95 % of a budget: move to the cheapest model of the cheap tier (DESIGN step 3);
                    # the reservation held the dearer estimate and the commit settles the real cost.
                    cheaper = self._cheaper_chain(key, chain)
                    if cheaper[0] != chain[0]:
                        chain = cheaper
                        ns = replace(ns, model_class=chain[0].name)
                        attempt.degrade("budget", "budget at 95 %: moved to the cheaper model")
                if level == Level.REDUCED:
                    assert self._degradation is not None
                    cheaper = self._cheaper_chain(key, chain)
                    if cheaper[0] != chain[0]:
                        chain = cheaper
                        ns = replace(ns, model_class=chain[0].name)
                    attempt.degrade(self._degradation.reason_code, f"reduced mode: {self._degradation.reason}")
                # Steps 7-8: generate through the first healthy member of the chain, with retries.
                async for delta in self._generate_through_chain(attempt, chain, deadline):
                    yield delta
            if attempt.finish is None:  # every backend failed: degraded path
                hit = (await self._lookup(attempt, ns, chain[0], cmd, deadline, allow_stale=True)
                       if not cmd.cache.no_cache else None)
                if hit is None:
                    raise Unavailable(f"no backend can serve {chain[0].name!r} right now and no cached answer "
                                      f"exists ({attempt.attempts} attempts); retry shortly", reason="NO_BACKEND")
                self._serve_hit(attempt, hit)
                attempt.degrade("no_backend", "every backend failed: served from cache")
                yield hit.content
            elif cacheable and not cmd.cache.no_store and attempt.finish in (FinishReason.STOP, FinishReason.LENGTH):
                attempt.store_ns = ns
            yield self._summary(attempt)
        except asyncio.CancelledError:
            attempt.status, attempt.finish = "cancelled", FinishReason.CANCELLED
            raise
        except GeneratorExit:
            attempt.status, attempt.finish = "cancelled", FinishReason.CANCELLED
            raise
        except (QuotaExceeded, Overloaded) as exc:
            attempt.status, attempt.error_reason = "rejected", exc.reason
            raise
        except TollgateError as exc:
            attempt.status, attempt.error_reason = "error", exc.reason
            raise
        except Exception:
            attempt.status, attempt.error_reason = "error", "INTERNAL_ERROR"
            raise
        finally:
            self._spawn(self._settle(attempt))

    async def _augment(self, attempt: _Attempt, deadline: Deadline) -> GenerateCommand:
        """Retrieve for the last user message (in the key's own tenant) and add the sources as a system
        message after the caller's; the answer's citations map back to chunk ids at the end."""
        cmd = attempt.cmd
        query = next((m.content for m in reversed(cmd.messages) if m.role is Role.USER), "")[:MAX_QUERY_CHARS]
        try:
            if self._retrieval is None:
                raise Unavailable("retrieval is not configured on this gateway", reason="NO_RETRIEVAL")
            leash = Deadline(min(deadline.expires_at, time.monotonic() + self._retrieval_timeout),
                             deadline.from_caller)
            hits = await self._retrieval.search(attempt.key.principal.org_id, query, cmd.retrieval.top_k, leash)
        except (Unavailable, DeadlineExceeded) as exc:
            if cmd.retrieval.required:
                raise Unavailable(f"retrieval is required for this request and unavailable ({exc.reason})",
                                  reason="RETRIEVAL_UNAVAILABLE") from None
            attempt.degrade("retrieval_unavailable", f"answered without retrieved context ({exc.reason})")
            return cmd
        context = assemble_context(hits, cmd.retrieval.max_context_tokens)
        if not context.text:
            return cmd
        attempt.context = context
        cut = next((i for i, m in enumerate(cmd.messages) if m.role is not Role.SYSTEM), len(cmd.messages))
        messages = [*cmd.messages[:cut], ChatMessage(Role.SYSTEM, context.text), *cmd.messages[cut:]]
        return replace(cmd, messages=messages)

    async def _lookup(self, attempt: _Attempt, ns: CacheNamespace, model: ModelEntry, cmd: GenerateCommand,
                      deadline: Deadline, *, allow_stale: bool) -> CachedAnswer | None:
        try:
            return await self._cache.lookup(ns, model.name, cmd.messages, cmd.params,
                                            max_age_s=cmd.cache.max_age_s, allow_stale=allow_stale,
                                            exact_only=cmd.cache.no_semantic, deadline=self._side(deadline),
                                            price=self._price(model, attempt.started_at))
        except TollgateError as exc:
            # Fail open: whatever the cache's problem, the request is still served.
            log.warning("cache lookup skipped: %s", exc.reason)
            return None

    def _serve_hit(self, attempt: _Attempt, hit: CachedAnswer) -> None:
        attempt.cache_tier = hit.tier
        attempt.text = [hit.content]
        attempt.finish = FinishReason.STOP
        attempt.provider = "cache"
        # A hit costs nothing and is recorded with what it saved (the generation it replaced).
        attempt.saved_nano_usd = attempt.price.cost(hit.usage)
        attempt.usage = TokenUsage(0, 0, 0)
        if hit.stale:
            attempt.degrade("stale_cache", "the cached answer is past its freshness")

    async def _reserve(self, attempt: _Attempt, deadline: Deadline) -> None:
        cmd = attempt.cmd
        max_out = cmd.params.max_output_tokens or self._default_max_output
        estimate = TokenUsage(estimate_prompt_tokens(m.content for m in cmd.messages), max_out)
        try:
            attempt.reservation = await self._ratelimit.reserve(
                attempt.key.principal, cmd.client_ip, attempt.request_id, estimate.total,
                attempt.price.cost(estimate), self._side(deadline))
        except (Unavailable, DeadlineExceeded) as exc:
            # Fail open: the limiter being down must not take the gateway down (DESIGN: local limiter
            # stands in; until that lands the request is admitted and marked).
            log.warning("ratelimit unavailable (%s): admitting request %s unreserved", exc.reason,
                        attempt.request_id)
            attempt.degrade("ratelimit_unavailable", "admitted without a limit check (limiter unreachable)")
            return
        if attempt.reservation.degraded:
            attempt.degrade("ratelimit_unavailable", "the limiter ran without its store")

    async def _generate_through_chain(self, attempt: _Attempt, chain: list[ModelEntry],
                                      deadline: Deadline) -> AsyncIterator[str]:
        """Try (model, replica) candidates in chain order, each model's replicas least busy first.

        A retryable failure (backend down, overloaded, a provider's 429) moves on to the next candidate at
        once; when a whole round has failed, the next round waits an exponential backoff with jitter (or
        the backends' retry-after, if longer) and only starts if that leaves time before the caller's
        deadline. All attempts of a request share ``RetryPolicy.max_attempts``. A prompt too long for a
        model skips it for one with a larger context window. Once a delta has reached the client the
        request cannot switch backends, so a failure then is final.
        """
        cmd = attempt.cmd
        params = cmd.params
        if not params.max_output_tokens:
            params = GenerationParams(params.temperature, params.top_p, self._default_max_output, params.stop,
                                      params.seed)
        prompt_tokens = estimate_prompt_tokens(m.content for m in cmd.messages)
        chain = self._fit_context(attempt, chain, prompt_tokens)
        last_error: TollgateError | None = None
        round_no = 0
        while True:
            hints: list[float] = []
            tried = 0
            for model in list(chain):
                if model not in chain:
                    continue  # dropped by a context-window overflow this round
                for target in self._inference.order(model.targets):
                    if attempt.attempts >= self._retry.max_attempts:
                        break
                    attempt.attempts += 1
                    tried += 1
                    attempt.model, attempt.price = model, self._price(model, attempt.started_at)
                    try:
                        async for chunk in self._inference.generate(target, attempt.request_id,
                                                                    model.name, cmd.messages, params, deadline):
                            attempt.counted_output_tokens += chunk.output_tokens
                            if chunk.delta:
                                attempt.text.append(chunk.delta)
                                yield chunk.delta
                            if chunk.finish_reason is not None:
                                attempt.finish = chunk.finish_reason
                                attempt.usage = chunk.usage
                                attempt.provider = chunk.provider
                        self._observe(failed=False)
                        return
                    except TollgateError as exc:
                        if attempt.text:
                            raise  # tokens already reached the client: cannot switch models mid-answer
                        if is_context_overflow(exc):
                            chain = self._after_overflow(attempt, chain, model, prompt_tokens)
                            break
                        if not is_retryable(exc):
                            raise
                        if is_backend_fault(exc):
                            self._observe(failed=True)
                        hint = retry_after(exc)
                        if hint is not None:
                            hints.append(hint)
                            if isinstance(exc, QuotaExceeded | Overloaded):
                                # A provider's 429 or a full replica: not a breaker failure; honour its retry-after.
                                self._inference.cool_down(target, hint)
                        log.warning("request %s: model %s at %s failed (%s), attempt %d of %d", attempt.request_id,
                                    model.name, target, exc.reason, attempt.attempts, self._retry.max_attempts)
                        last_error = exc
            if attempt.attempts >= self._retry.max_attempts or not chain:
                break
            round_no += 1
            wait = self._retry.backoff(round_no)
            if tried == 0:
                # Nothing was callable this round: wait for a cooling replica, if any will come back.
                cooling = [c for m in chain if (c := self._inference.cooling_for(m.targets)) is not None]
                if not cooling:
                    break
                wait = max(wait, min(cooling))
            elif hints and len(hints) == tried:
                wait = max(wait, min(hints))
            if deadline.remaining() < wait + self._retry.min_attempt_s:
                break  # never retry past the caller's deadline
            await asyncio.sleep(wait)
        if last_error is not None:
            log.warning("every backend failed for request %s after %d attempts: %s", attempt.request_id,
                        attempt.attempts, last_error.reason)

    def _fit_context(self, attempt: _Attempt, chain: list[ModelEntry], prompt_tokens: int) -> list[ModelEntry]:
        """Leave out the models whose context window the prompt does not fit; if none is left, fall back to
        the registry's model with the smallest window that fits."""
        fits = fitting(chain, prompt_tokens)
        if fits:
            return fits
        bigger = larger_window([m for m in self._registry.models() if attempt.key.may_use(m.name)],
                               max(m.context_window for m in chain), prompt_tokens, chain[0].cost_tier)
        if bigger is None:
            error = InvalidArgument([FieldViolation(
                "input.messages", f"about {prompt_tokens} prompt tokens do not fit the context window of any "
                                  "model this key may use")])
            error.reason = CONTEXT_WINDOW_EXCEEDED
            raise error
        attempt.add_route_reason(f"context window: {chain[0].name} ({chain[0].context_window}) -> {bigger.name} "
                                 f"({bigger.context_window})")
        return [bigger]

    def _after_overflow(self, attempt: _Attempt, chain: list[ModelEntry], model: ModelEntry,
                        prompt_tokens: int) -> list[ModelEntry]:
        """The backend said the prompt does not fit ``model``: drop it and every model with no larger window,
        adding the registry's next larger window when the chain has none."""
        rest = [m for m in chain if m != model and (m.context_window <= 0 or m.context_window > model.context_window)]
        if rest:
            return rest
        bigger = larger_window([m for m in self._registry.models() if attempt.key.may_use(m.name)],
                               model.context_window, prompt_tokens, model.cost_tier, exclude=chain)
        if bigger is None:
            return []
        attempt.add_route_reason(f"context window: {model.name} overflowed -> {bigger.name} ({bigger.context_window})")
        return [bigger]

    def _observe(self, *, failed: bool) -> None:
        if self._degradation is not None:
            self._degradation.record(failed=failed)

    def _price(self, model: ModelEntry, started_at: datetime) -> Price:
        # The version in force when the request started (issue 6), even if it generates after a change.
        return self._registry.price(model.name, started_at) or FREE

    def _side(self, deadline: Deadline) -> Deadline:
        """Side calls (cache, limiter) get a short leash inside the request's deadline."""
        return Deadline(min(deadline.expires_at, time.monotonic() + self._side_timeout), deadline.from_caller)

    def _summary(self, attempt: _Attempt) -> Summary:
        usage = attempt.billed_usage()
        assert attempt.model is not None
        return Summary(
            request_id=attempt.request_id, model=attempt.model.name, provider=attempt.provider,
            usage=usage, cost_nano_usd=attempt.price.cost(usage), saved_nano_usd=attempt.saved_nano_usd,
            cache_tier=attempt.cache_tier, degraded_reasons=list(attempt.degraded),
            finish_reason=attempt.finish or FinishReason.STOP, latency_s=time.monotonic() - attempt.t0,
            price_version=attempt.price.version,
            cited_chunk_ids=cited_chunk_ids("".join(attempt.text), attempt.context) if attempt.context else [],
            degradation_level=attempt.level.name.lower(), degraded_detail="; ".join(attempt.degraded_detail),
            route_reason=attempt.route_reason, attempts=attempt.attempts, variant=attempt.variant)

    # --- settlement (steps 8-10), off the critical path ----------------------------------

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _settle(self, attempt: _Attempt) -> None:
        usage = attempt.billed_usage()
        cost = attempt.price.cost(usage)
        settle_deadline = Deadline.after(5.0)
        if attempt.reserving is not None and not attempt.reserving.done():
            # A cache hit (or an early exit) answered while the reservation was still in flight.
            await asyncio.wait([attempt.reserving], timeout=settle_deadline.remaining())
        if attempt.reserving is not None and attempt.reserving.done() and not attempt.reserving.cancelled():
            attempt.reserving.exception()  # retrieved: a refused reservation is no settlement's business
        try:
            if attempt.reservation is not None:
                if attempt.cache_tier == "miss" and (attempt.text or attempt.usage):
                    await self._ratelimit.commit(attempt.reservation.reservation_id, usage.total, cost,
                                                 settle_deadline)
                else:
                    await self._ratelimit.release(attempt.reservation.reservation_id, settle_deadline)
        except TollgateError as exc:
            # An uncommitted reservation expires and is refunded by the limiter itself.
            log.warning("reservation %s not settled: %s", attempt.request_id, exc.reason)
        if attempt.store_ns is not None and attempt.model is not None:
            try:
                await self._cache.store(attempt.store_ns, attempt.model.name, attempt.cmd.messages,
                                        attempt.cmd.params, "".join(attempt.text), usage, settle_deadline)
            except TollgateError as exc:
                log.warning("cache store skipped: %s", exc.reason)
        if attempt.model is None:
            return  # rejected before a model was chosen: nothing was served or billed
        await self._usage.record(UsageEvent(
            request_id=attempt.request_id, started_at=attempt.started_at, finished_at=utcnow(),
            org_id=attempt.key.principal.org_id, team_id=attempt.key.principal.team_id,
            key_id=attempt.key.key_id, model=attempt.model.name, provider=attempt.provider,
            input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens, cost_nano_usd=cost,
            saved_nano_usd=attempt.saved_nano_usd, price_version=attempt.price.version or None,
            cache_tier=attempt.cache_tier, status=attempt.status, error_reason=attempt.error_reason,
            latency_ms=int((time.monotonic() - attempt.t0) * 1000), degraded=bool(attempt.degraded),
            variant=attempt.variant, labels=dict(attempt.cmd.labels)))

    async def aclose(self) -> None:
        """Wait for in-flight settlements (shutdown must not lose usage)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

