"""The request path with in-memory downstreams: policy, fallback, settlement, billing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import pytest

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
from libs.errors import InvalidArgument, PermissionDenied, QuotaExceeded, QuotaViolation, Unavailable
from libs.rag_context import ContextChunk
from services.router.control.keys import KeyRecord
from services.router.control.pricing import Price
from services.router.control.registry import ModelEntry, Registry, RegistrySnapshot
from services.router.ledger.events import UsageEvent
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.ports import CachedAnswer, CacheNamespace, Reservation
from services.router.pipeline.request import CachePolicy, GenerateCommand, RetrievalPolicy, Summary

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

    def order(self, targets: Sequence[str]) -> list[str]:
        return [t for t in targets if self.modes.get(t) != "open"]

    def cool_down(self, target: str, seconds: float) -> None:
        return None

    def cooling_for(self, targets: Sequence[str]) -> float | None:
        return None

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


class Ledger:
    def __init__(self) -> None:
        self.events: list[UsageEvent] = []

    async def record(self, event: UsageEvent) -> None:
        self.events.append(event)


def _registry(*models: ModelEntry) -> Registry:
    registry = Registry(None, 60)
    start = datetime(2020, 1, 1, tzinfo=UTC)
    registry.replace(RegistrySnapshot(
        models={m.name: m for m in models},
        prices={m.name: [Price(i + 1, m.name, effective_from=start, **PRICE)] for i, m in enumerate(models)}))
    return registry


PRIMARY = ModelEntry("primary", "p", "t-primary", 8192, "strong")
BACKUP = ModelEntry("backup", "p", "t-backup", 8192, "cheap")
KEY = KeyRecord("k1", Principal("org1", "team1", "k1"), "member", (), None, False)


def _gateway(modes: dict[str, str]) -> tuple[Gateway, MemoryCache, MemoryLimiter, ScriptedInference, Ledger]:
    cache, limiter, inference, ledger = MemoryCache(), MemoryLimiter(), ScriptedInference(modes), Ledger()
    gw = Gateway(registry=_registry(PRIMARY, BACKUP), cache=cache, ratelimit=limiter, inference=inference,
                 usage=ledger, default_max_output_tokens=100, side_call_timeout_s=0.5)
    return gw, cache, limiter, inference, ledger


def _cmd(model: str = "primary", *, temperature: float | None = 0.0, **kw: object) -> GenerateCommand:
    return GenerateCommand(model=model, messages=[ChatMessage(Role.USER, "capital of France?")],
                           params=GenerationParams(temperature=temperature, max_output_tokens=50), **kw)  # type: ignore[arg-type]


async def _run(gw: Gateway, cmd: GenerateCommand) -> tuple[str, Summary]:
    text, summary = [], None
    async for event in gw.generate(KEY, cmd, Deadline.after(5)):
        if isinstance(event, Summary):
            summary = event
        else:
            text.append(event)
    await gw.aclose()
    assert summary is not None
    return "".join(text), summary


async def test_miss_then_exact_hit_costs_nothing_and_records_saving() -> None:
    gw, _, limiter, _, ledger = _gateway({"t-primary": "ok"})
    text, first = await _run(gw, _cmd())
    assert text == "Paris is the capital." and first.cache_tier == "miss"
    assert first.cost_nano_usd == 10 * 1_000 + 3 * 2_000  # $1/M in, $2/M out
    assert limiter.committed[first.request_id] == 13
    text2, second = await _run(gw, _cmd())
    assert text2 == text and second.cache_tier == "exact"
    assert second.cost_nano_usd == 0 and second.saved_nano_usd == first.cost_nano_usd
    assert [e.cache_tier for e in ledger.events] == ["miss", "exact"]
    assert len({e.request_id for e in ledger.events}) == 2


async def test_nondeterministic_requests_are_not_cached_unless_opted_in() -> None:
    gw, cache, *_ = _gateway({"t-primary": "ok"})
    await _run(gw, _cmd(temperature=0.7))
    assert not cache.entries
    await _run(gw, _cmd(temperature=0.7, cache=CachePolicy(allow_nondeterministic=True)))
    assert cache.entries


async def test_no_store_and_no_cache() -> None:
    gw, cache, *_ = _gateway({"t-primary": "ok"})
    await _run(gw, _cmd(cache=CachePolicy(no_store=True)))
    assert not cache.entries
    await _run(gw, _cmd())
    _, s = await _run(gw, _cmd(cache=CachePolicy(no_cache=True)))
    assert s.cache_tier == "miss"


async def test_fallback_chain_moves_on_when_the_primary_is_down() -> None:
    gw, _, _, inference, _ = _gateway({"t-primary": "down", "t-backup": "ok"})
    _, s = await _run(gw, _cmd(fallback_models=("backup",)))
    assert s.model == "backup" and inference.calls == ["t-primary", "t-backup"]


async def test_open_breaker_is_skipped_without_a_call() -> None:
    gw, _, _, inference, _ = _gateway({"t-primary": "open", "t-backup": "ok"})
    _, s = await _run(gw, _cmd(fallback_models=("backup",)))
    assert s.model == "backup" and inference.calls == ["t-backup"]


async def test_no_backend_serves_a_stale_cached_answer_marked_degraded() -> None:
    gw, cache, *_ = _gateway({"t-primary": "down"})
    ns_key = ("org1", "capital of France?")
    # Expired entry: invisible to a normal lookup, served only on the degraded path.
    cache.entries[ns_key] = CachedAnswer("Paris.", TokenUsage(10, 2, 0), "primary", "exact", True)
    cache.stale_only.add(ns_key)
    text, s = await _run(gw, _cmd())
    assert text == "Paris." and s.degraded and "no_backend" in s.degraded_reasons
    assert s.cost_nano_usd == 0 and s.saved_nano_usd > 0


async def test_no_backend_and_no_cache_is_unavailable_and_releases_the_reservation() -> None:
    gw, _, limiter, _, ledger = _gateway({"t-primary": "down"})
    with pytest.raises(Unavailable, match="no backend"):
        await _run(gw, _cmd())
    await gw.aclose()
    assert limiter.released and not limiter.committed
    assert ledger.events[0].status == "error" and ledger.events[0].cost_nano_usd == 0


async def test_quota_rejection_propagates_and_bills_nothing() -> None:
    gw, _, limiter, inference, ledger = _gateway({"t-primary": "ok"})
    limiter.reject = True
    with pytest.raises(QuotaExceeded):
        await _run(gw, _cmd())
    await gw.aclose()
    assert not inference.calls
    assert ledger.events[0].status == "rejected" and ledger.events[0].cost_nano_usd == 0


async def test_fail_open_when_cache_and_limiter_are_down() -> None:
    gw, cache, limiter, _, _ = _gateway({"t-primary": "ok"})
    cache.down = limiter.down = True
    text, s = await _run(gw, _cmd())
    assert text and s.degraded and "ratelimit_unavailable" in s.degraded_reasons


async def test_cancelled_stream_is_billed_for_what_was_generated() -> None:
    gw, _, limiter, _, ledger = _gateway({"t-primary": "slow"})
    events = gw.generate(KEY, _cmd(), Deadline.after(5))
    received = [await events.__anext__() for _ in range(5)]
    assert received == ["word "] * 5
    await events.aclose()  # what grpc.aio does when the client cancels
    await gw.aclose()
    [event] = ledger.events
    assert event.status == "cancelled" and event.output_tokens > 0 and event.cost_nano_usd > 0
    assert limiter.committed[event.request_id] == event.input_tokens + event.output_tokens


async def test_unknown_and_forbidden_models() -> None:
    gw, *_ = _gateway({"t-primary": "ok"})
    with pytest.raises(InvalidArgument) as err:
        await _run(gw, _cmd("nope", fallback_models=("also-nope",)))
    assert [v.field for v in err.value.violations] == ["input.model", "input.fallback_models[0]"]
    restricted = KeyRecord("k2", Principal("o", "t", "k2"), "member", ("backup",), None, False)
    with pytest.raises(PermissionDenied):
        gw.resolve_chain(restricted, _cmd("primary"))


async def test_replicas_of_a_model_are_tried_before_the_next_model() -> None:
    replicated = ModelEntry("primary", "p", "t-a, t-b", 8192, "strong")
    cache, limiter, inference, ledger = MemoryCache(), MemoryLimiter(), ScriptedInference(
        {"t-a": "down", "t-b": "ok", "t-backup": "ok"}), Ledger()
    gw = Gateway(registry=_registry(replicated, BACKUP), cache=cache, ratelimit=limiter, inference=inference,
                 usage=ledger, default_max_output_tokens=100, side_call_timeout_s=0.5)
    _, s = await _run(gw, _cmd(fallback_models=("backup",)))
    assert s.model == "primary" and inference.calls == ["t-a", "t-b"]


async def test_auto_picks_the_cheap_tier() -> None:
    gw, *_ = _gateway({"t-backup": "ok"})
    _, s = await _run(gw, _cmd("auto"))
    assert s.model == "backup"


class FakeRetrieval:
    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.queries: list[tuple[str, str]] = []

    async def search(self, tenant_id: str, query: str, top_k: int, deadline: Deadline) -> list[ContextChunk]:
        self.queries.append((tenant_id, query))
        if self.down:
            raise Unavailable("retrieval down", reason="UNAVAILABLE")
        return [ContextChunk("doc1#0", "doc1", "Paris is the capital of France.", 0.9),
                ContextChunk("doc2#3", "doc2", "France is in Europe.", 0.5)]


def _rag_gateway(retrieval: FakeRetrieval) -> tuple[Gateway, ScriptedInference]:
    inference = ScriptedInference({"t-primary": "ok"})
    gw = Gateway(registry=_registry(PRIMARY, BACKUP), cache=MemoryCache(), ratelimit=MemoryLimiter(),
                 inference=inference, usage=Ledger(), default_max_output_tokens=100, side_call_timeout_s=0.5,
                 retrieval=retrieval)
    return gw, inference


async def test_retrieval_adds_sources_after_system_messages_and_returns_citations() -> None:
    retrieval = FakeRetrieval()
    gw, inference = _rag_gateway(retrieval)
    messages = [ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.USER, "capital of France?")]
    cmd = GenerateCommand(model="primary", params=GenerationParams(temperature=0.0), messages=messages,
                          retrieval=RetrievalPolicy(enabled=True))
    _, s = await _run(gw, cmd)
    assert retrieval.queries == [("org1", "capital of France?")]  # the key's tenant, never the caller's word
    prompt = inference.prompts[0]
    assert [m.role for m in prompt] == [Role.SYSTEM, Role.SYSTEM, Role.USER]
    assert "[1]" in prompt[1].content and "Paris is the capital of France." in prompt[1].content
    # Best chunk first, second best last: label 2 is doc2#3.
    assert s.cited_chunk_ids == ["doc2#3"] and not s.degraded


async def test_optional_retrieval_down_answers_without_context_marked_degraded() -> None:
    gw, inference = _rag_gateway(FakeRetrieval(down=True))
    _, s = await _run(gw, _cmd(retrieval=RetrievalPolicy(enabled=True)))
    assert "retrieval_unavailable" in s.degraded_reasons and s.cited_chunk_ids == []
    assert len(inference.prompts[0]) == 1


async def test_required_retrieval_down_is_unavailable() -> None:
    gw, inference = _rag_gateway(FakeRetrieval(down=True))
    with pytest.raises(Unavailable, match="retrieval is required"):
        await _run(gw, _cmd(retrieval=RetrievalPolicy(enabled=True, required=True)))
    assert not inference.calls
