"""One generation request as the pipeline sees it: the command the servicer decoded, the state every
stage reads and writes, and the summary the caller gets at the end. Nothing here imports gRPC."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from libs.chat import ChatMessage, FinishReason, GenerationParams, TokenUsage
from libs.errors import Overloaded, QuotaExceeded, TollgateError
from libs.rag_context import RetrievedContext
from libs.tokens import estimate_prompt_tokens, estimate_tokens
from services.router.control.keys import KeyRecord
from services.router.control.pricing import FREE, Price
from services.router.control.registry import ModelEntry, Registry
from services.router.ledger.events import utcnow
from services.router.pipeline.degradation import Level
from services.router.pipeline.local_limits import LocalHold
from services.router.pipeline.ports import CacheNamespace, Reservation


def price_in_force(registry: Registry, model: ModelEntry, started_at: datetime) -> Price:
    """The price version in force when the request started (issue 6), even if it generates after a change."""
    return registry.price(model.name, started_at) or FREE


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

    @property
    def cacheable(self) -> bool:
        """Whether an answer to this command may be served from, or stored in, the cache at all."""
        return self.params.deterministic or self.cache.allow_nondeterministic


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
class RequestState:
    """Mutable state of one request, read by accounting whatever way the request ends."""

    request_id: str
    key: KeyRecord
    cmd: GenerateCommand
    started_at: datetime
    t0: float
    model: ModelEntry | None = None
    provider: str = ""
    price: Price = FREE
    reservation: Reservation | None = None
    # This router's own record of the admission (pipeline/local_limits.py), settled by accounting.
    local_hold: LocalHold | None = None
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

    @classmethod
    def begin(cls, key: KeyRecord, cmd: GenerateCommand, request_id: str | None = None) -> RequestState:
        return cls(request_id or uuid.uuid4().hex, key, cmd, utcnow(), time.monotonic())

    def use_model(self, model: ModelEntry, registry: Registry) -> None:
        """Generate (or price a hit) with ``model`` at the price version in force when the request started,
        even if the price changes while it runs."""
        self.model = model
        self.price = price_in_force(registry, model, self.started_at)

    def add_route_reason(self, reason: str) -> None:
        self.route_reason = f"{self.route_reason}; {reason}" if self.route_reason else reason

    def degrade(self, reason: str, detail: str) -> None:
        if reason not in self.degraded:
            self.degraded.append(reason)
        if detail and detail not in self.degraded_detail:
            self.degraded_detail.append(detail)

    def end_with(self, exc: BaseException) -> None:
        """Record how the request ended when ``exc`` stopped it (the ledger row's status and reason)."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.status, self.finish = "cancelled", FinishReason.CANCELLED
        elif isinstance(exc, QuotaExceeded | Overloaded):
            self.status, self.error_reason = "rejected", exc.reason
        elif isinstance(exc, TollgateError):
            self.status, self.error_reason = "error", exc.reason
        elif isinstance(exc, Exception):
            self.status, self.error_reason = "error", "INTERNAL_ERROR"

    def prompt_tokens(self) -> int:
        return estimate_prompt_tokens(m.content for m in self.cmd.messages)

    def billed_usage(self) -> TokenUsage:
        if self.usage is not None:
            return self.usage
        if not self.text:
            return TokenUsage()  # nothing was generated: nothing to bill
        # Cut off before the engine reported usage: bill what was sent and generated, with the engine's
        # own per-delta token counts when it gave them, else an estimate from the text.
        generated = self.counted_output_tokens or sum(estimate_tokens(t) for t in self.text)
        return TokenUsage(self.prompt_tokens(), generated, 0)
