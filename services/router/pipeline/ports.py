"""What the pipeline asks of the rest of the mesh, as Protocols.

``services/router/downstreams.py`` implements them over gRPC; tests use real services or in-process
ones. Nothing here imports gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from libs.chat import ChatMessage, GenerationChunk, GenerationParams, Principal, TokenUsage
from libs.deadlines import Deadline
from libs.errors import Unavailable
from libs.rag_context import ContextChunk
from services.router.control.experiments import Experiment, Variant
from services.router.control.pricing import Price
from services.router.ledger.events import UsageEvent
from services.router.pipeline.complexity import RouteDecision


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


@dataclass(frozen=True)
class Charge:
    """Usage this router's local limiter admitted, owed to the ratelimit service (``local_charges.py``)."""

    principal: Principal
    client_ip: str
    request_id: str  # the idempotency id: the service draws a request id once
    requests: int
    tokens: int
    cost_nano_usd: int
    at: float  # when the request started (Unix seconds): its budget window, and how much has refilled since


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


class ChargeClient(Protocol):
    async def charge(self, charge: Charge, deadline: Deadline) -> None:
        """Draw ``charge`` from the subject's buckets and budgets, never refused; idempotent per request id."""
        ...


class RetrievalClient(Protocol):
    async def search(self, tenant_id: str, query: str, top_k: int, deadline: Deadline) -> list[ContextChunk]: ...


class UsageSink(Protocol):
    async def record(self, event: UsageEvent) -> None: ...


class AutoRouter(Protocol):
    """The complexity router behind model "auto" (services/router/pipeline/complexity.py)."""

    def decide(self, messages: Sequence[ChatMessage]) -> RouteDecision: ...


class ExperimentAssigner(Protocol):
    """Active A/B experiments (services/router/control/experiments.py: ExperimentBook)."""

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

    def record_fault(self, target: str, exc: Unavailable) -> None:
        """Count a fault the request path detected itself (no first token in time, a stall; the call was
        cancelled) against ``target``'s breaker."""
        ...

    def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                 params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]: ...
