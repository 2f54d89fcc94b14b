"""In-memory stand-ins for the router pipeline's ports (cache, limiter, inference, ledger) and a gateway
built on them, shared by the pipeline's and the servicer's unit tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from libs.chat import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationParams,
    Principal,
    Role,
    TokenUsage,
)
from libs.deadlines import Deadline
from libs.errors import (
    InvalidArgument,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unavailable,
)
from services.router.control.keys import KeyRecord
from services.router.control.pricing import Price
from services.router.control.registry import ModelEntry, Registry, RegistrySnapshot
from services.router.ledger.events import UsageEvent
from services.router.pipeline.failover import CONTEXT_WINDOW_EXCEEDED
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.ports import CachedAnswer, CacheNamespace, Reservation
from services.router.pipeline.request import GenerateCommand, Summary

PRICE = dict(input_per_mtok=1_000_000_000, output_per_mtok=2_000_000_000, cached_input_per_mtok=0)


class MemoryCache:
    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], CachedAnswer] = {}
        self.stale_only: set[tuple[str, str]] = set()
        self.down = False

    def _key(self, ns: CacheNamespace, messages: list[ChatMessage]) -> tuple[str, str]:
        return ns.tenant_id, "|".join(m.content for m in messages)

    async def lookup(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                     *, max_age_s: int, allow_stale: bool, exact_only: bool, deadline: Deadline,
                     price: Price | None = None) -> CachedAnswer | None:
        if self.down:
            raise Unavailable("cache down")
        key = self._key(ns, messages)
        if key in self.stale_only and not allow_stale:
            return None
        return self.entries.get(key)

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None:
        self.entries[self._key(ns, messages)] = CachedAnswer(content, usage, model, "exact", False)


class MemoryLimiter:
    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}
        self.committed: dict[str, int] = {}
        self.released: list[str] = []
        self.reject = False
        self.down = False

    async def reserve(self, principal: Principal, client_ip: str, request_id: str, estimated_tokens: int,
                      estimated_cost_nano_usd: int, deadline: Deadline) -> Reservation:
        if self.down:
            raise Unavailable("ratelimit down")
        if self.reject:
            raise QuotaExceeded("over", [QuotaViolation("key:k", "tpm")], 3.0)
        self.reserved[request_id] = estimated_tokens
        return Reservation(request_id, False, False)

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        self.committed[reservation_id] = actual_tokens

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        self.released.append(reservation_id)


class ScriptedInference:
    """Per target: 'ok' answers in 3 deltas, 'down' raises Unavailable, 'slow' streams forever."""

    def __init__(self, modes: dict[str, str]) -> None:
        self.modes = modes
        self.calls: list[str] = []
        self.prompts: list[list[ChatMessage]] = []
        self.faults: list[str] = []  # targets the request path counted a fault against (timeouts)

    def order(self, targets: Sequence[str]) -> list[str]:
        return [t for t in targets if self.modes.get(t) != "open"]

    def cool_down(self, target: str, seconds: float) -> None:
        return None

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        return None

    def record_fault(self, target: str, exc: Unavailable) -> None:
        self.faults.append(target)

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        self.calls.append(target)
        mode = self.modes[target]
        if mode == "down":
            raise Unavailable("backend down", reason="UNAVAILABLE")
        if mode == "slow":
            while True:
                yield GenerationChunk(delta="word ")
                await asyncio.sleep(0.01)
        self.prompts.append(messages)
        if any(m.role is Role.SYSTEM and "Sources:" in m.content for m in messages):
            for word in ("Paris ", "is ", "the capital [2]."):
                yield GenerationChunk(delta=word)
            yield GenerationChunk(usage=TokenUsage(50, 3, 0), finish_reason=FinishReason.STOP, model=model,
                                  provider="fake")
            return
        for word in ("Paris ", "is ", "the capital."):
            yield GenerationChunk(delta=word)
        yield GenerationChunk(usage=TokenUsage(10, 3, 0), finish_reason=FinishReason.STOP, model=model,
                              provider="fake")


def _overflow() -> InvalidArgument:
    err = InvalidArgument([], "prompt too long")
    err.reason = CONTEXT_WINDOW_EXCEEDED
    return err


class Backends:
    """Per target, a script of outcomes consumed call by call (the last one repeats):
    ok (two counted deltas, then usage) | down (backend fault) | 429 (provider limit, retry-after 0.1 s)
    | busy (overloaded, retry-after 0.1 s) | hint (unavailable with retry-after 0.1 s) | overflow
    | denied (not retryable) | partial (one delta, then a backend fault) | hang (no chunk, ever) | stall (one
    delta, then nothing) | late (like ok, the first chunk after ``late_s[target]`` seconds, default 0.2)."""

    def __init__(self, scripts: dict[str, list[str]], *, cooling: dict[str, float] | None = None,
                 open_breakers: Sequence[str] = (), late_s: dict[str, float] | None = None) -> None:
        self.scripts = scripts
        self.late_s = dict(late_s or {})
        self.open_breakers = set(open_breakers)  # never ordered, and not cooling either
        self.calls: list[tuple[str, str, float]] = []  # target, model, when
        self.params: list[GenerationParams] = []
        self.cool_downs: list[tuple[str, float]] = []
        self.orders = 0  # how often a round asked for the replicas to try
        self.cooling = dict(cooling or {})  # target -> monotonic time it takes traffic again
        self.faults: list[tuple[str, str]] = []  # (target, reason) the stage counted against a breaker
        self.cancelled: list[str] = []  # targets whose call was cancelled while it hung (or was late)

    def order(self, targets: Sequence[str]) -> list[str]:
        self.orders += 1
        now = time.monotonic()
        return [t for t in targets if self.cooling.get(t, 0) <= now and t not in self.open_breakers]

    def cool_down(self, target: str, seconds: float) -> None:
        self.cool_downs.append((target, seconds))

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        now = time.monotonic()
        waits = [self.cooling[t] - now for t in targets if self.cooling.get(t, 0) > now]
        return min(waits) if waits else None

    def record_fault(self, target: str, exc: Unavailable) -> None:
        self.faults.append((target, exc.reason))

    def targets(self) -> list[str]:
        return [t for t, _, _ in self.calls]

    async def generate(self, target: str, request_id: str, model: str, messages: list[ChatMessage],
                       params: GenerationParams, deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        self.calls.append((target, model, time.monotonic()))
        self.params.append(params)
        script = self.scripts[target]
        mode = script.pop(0) if len(script) > 1 else script[0]
        errors: dict[str, TollgateError] = {
            "down": Unavailable("backend down", reason="BACKEND_ERROR"),
            "429": QuotaExceeded("provider rate limit", [QuotaViolation("provider:p", "rpm")], 0.1),
            "busy": Overloaded("queue full", 0.1),
            "hint": Unavailable("restarting", retry_after_s=0.1, reason="BACKEND_ERROR"),
            "overflow": _overflow(),
            "denied": PermissionDenied("no"),
        }
        if mode in errors:
            raise errors[mode]
        if mode == "hang":
            await self._hang(target)
        if mode == "late":
            try:
                await asyncio.sleep(self.late_s.get(target, 0.2))
            except asyncio.CancelledError:
                self.cancelled.append(target)
                raise
        yield GenerationChunk(delta="Par", output_tokens=1)
        if mode == "partial":
            raise Unavailable("connection reset", reason="BACKEND_ERROR")
        if mode == "stall":
            await self._hang(target)
        yield GenerationChunk(delta="is", output_tokens=1)
        yield GenerationChunk(output_tokens=0, usage=TokenUsage(9, 2, 0), finish_reason=FinishReason.STOP,
                              model=model, provider=f"prov-{target}")

    async def _hang(self, target: str) -> None:
        try:
            await asyncio.Event().wait()  # never set: a backend that hangs
        except asyncio.CancelledError:
            self.cancelled.append(target)
            raise


class Ledger:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    async def record(self, event: UsageEvent) -> None:
        self.events.append(event)


def registry_of(*models: ModelEntry) -> Registry:
    registry = Registry(None, 60)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    registry.replace(RegistrySnapshot(
        models={m.name: m for m in models},
        prices={m.name: [Price(i + 1, m.name, effective_from=start, **PRICE)] for i, m in enumerate(models)}))
    return registry


PRIMARY = ModelEntry("primary", "p", "t-primary", 8192, "strong")
BACKUP = ModelEntry("backup", "p", "t-backup", 8192, "cheap")
KEY = KeyRecord("k1", Principal("org1", "team1", "k1"), "member", (), None, False)


def scripted_gateway(modes: dict[str, str]) -> tuple[Gateway, MemoryCache, MemoryLimiter, ScriptedInference, Ledger]:
    cache, limiter, inference, ledger = MemoryCache(), MemoryLimiter(), ScriptedInference(modes), Ledger()
    gw = Gateway(registry=registry_of(PRIMARY, BACKUP), cache=cache, ratelimit=limiter, inference=inference,
                 usage=ledger, default_max_output_tokens=100, side_call_timeout_s=0.5)
    return gw, cache, limiter, inference, ledger


def command(model: str = "primary", *, temperature: float | None = 0.0, **kw: object) -> GenerateCommand:
    return GenerateCommand(model=model, messages=[ChatMessage(Role.USER, "capital of France?")],
                           params=GenerationParams(temperature=temperature, max_output_tokens=50), **kw)  # type: ignore[arg-type]


async def run_collected(gw: Gateway, cmd: GenerateCommand) -> tuple[str, Summary]:
    text, summary = [], None
    async for event in gw.generate(KEY, cmd, Deadline.after(5)):
        if isinstance(event, Summary):
            summary = event
        else:
            text.append(event)
    await gw.aclose()
    assert summary is not None
    return "".join(text), summary
