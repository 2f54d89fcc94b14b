"""The request path with in-memory downstreams: policy, fallback, settlement, billing."""

from __future__ import annotations

import pytest

from libs.chat import (
    ChatMessage,
    GenerationParams,
    Principal,
    Role,
    TokenUsage,
)
from libs.deadlines import Deadline
from libs.errors import InvalidArgument, PermissionDenied, QuotaExceeded, Unavailable
from libs.rag_context import ContextChunk
from services.router.control.keys import KeyRecord
from services.router.control.registry import ModelEntry
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.ports import CachedAnswer
from services.router.pipeline.request import CachePolicy, GenerateCommand, RetrievalPolicy
from tests.support.router import (
    BACKUP,
    KEY,
    PRIMARY,
    Ledger,
    MemoryCache,
    MemoryLimiter,
    ScriptedInference,
    command,
    registry_of,
    run_collected,
    scripted_gateway,
)


async def test_miss_then_exact_hit_costs_nothing_and_records_saving() -> None:
    gw, _, limiter, _, ledger = scripted_gateway({"t-primary": "ok"})
    text, first = await run_collected(gw, command())
    assert text == "Paris is the capital." and first.cache_tier == "miss"
    assert first.cost_nano_usd == 10 * 1_000 + 3 * 2_000  # $1/M in, $2/M out
    assert limiter.committed[first.request_id] == 13
    text2, second = await run_collected(gw, command())
    assert text2 == text and second.cache_tier == "exact"
    assert second.cost_nano_usd == 0 and second.saved_nano_usd == first.cost_nano_usd
    assert [e.cache_tier for e in ledger.events] == ["miss", "exact"]
    assert len({e.request_id for e in ledger.events}) == 2


async def test_nondeterministic_requests_are_not_cached_unless_opted_in() -> None:
    gw, cache, *_ = scripted_gateway({"t-primary": "ok"})
    await run_collected(gw, command(temperature=0.7))
    assert not cache.entries
    await run_collected(gw, command(temperature=0.7, cache=CachePolicy(allow_nondeterministic=True)))
    assert cache.entries


async def test_no_store_and_no_cache() -> None:
    gw, cache, *_ = scripted_gateway({"t-primary": "ok"})
    await run_collected(gw, command(cache=CachePolicy(no_store=True)))
    assert not cache.entries
    await run_collected(gw, command())
    _, s = await run_collected(gw, command(cache=CachePolicy(no_cache=True)))
    assert s.cache_tier == "miss"


async def test_fallback_chain_moves_on_when_the_primary_is_down() -> None:
    gw, _, _, inference, _ = scripted_gateway({"t-primary": "down", "t-backup": "ok"})
    _, s = await run_collected(gw, command(fallback_models=("backup",)))
    assert s.model == "backup" and inference.calls == ["t-primary", "t-backup"]


async def test_open_breaker_is_skipped_without_a_call() -> None:
    gw, _, _, inference, _ = scripted_gateway({"t-primary": "open", "t-backup": "ok"})
    _, s = await run_collected(gw, command(fallback_models=("backup",)))
    assert s.model == "backup" and inference.calls == ["t-backup"]


async def test_no_backend_serves_a_stale_cached_answer_marked_degraded() -> None:
    gw, cache, *_ = scripted_gateway({"t-primary": "down"})
    ns_key = ("org1", "capital of France?")
    # Expired entry: invisible to a normal lookup, served only on the degraded path.
    cache.entries[ns_key] = CachedAnswer("Paris.", TokenUsage(10, 2, 0), "primary", "exact", True)
    cache.stale_only.add(ns_key)
    text, s = await run_collected(gw, command())
    assert text == "Paris." and s.degraded and "no_backend" in s.degraded_reasons
    assert s.cost_nano_usd == 0 and s.saved_nano_usd > 0


async def test_no_backend_and_no_cache_is_unavailable_and_releases_the_reservation() -> None:
    gw, _, limiter, _, ledger = scripted_gateway({"t-primary": "down"})
    with pytest.raises(Unavailable, match="no backend"):
        await run_collected(gw, command())
    await gw.aclose()
    assert limiter.released and not limiter.committed
    assert ledger.events[0].status == "error" and ledger.events[0].cost_nano_usd == 0


async def test_quota_rejection_propagates_and_bills_nothing() -> None:
    gw, _, limiter, inference, ledger = scripted_gateway({"t-primary": "ok"})
    limiter.reject = True
    with pytest.raises(QuotaExceeded):
        await run_collected(gw, command())
    await gw.aclose()
    assert not inference.calls
    assert ledger.events[0].status == "rejected" and ledger.events[0].cost_nano_usd == 0


async def test_fail_open_when_cache_and_limiter_are_down() -> None:
    gw, cache, limiter, _, _ = scripted_gateway({"t-primary": "ok"})
    cache.down = limiter.down = True
    text, s = await run_collected(gw, command())
    assert text and s.degraded and "ratelimit_unavailable" in s.degraded_reasons


async def test_cancelled_stream_is_billed_for_what_was_generated() -> None:
    gw, _, limiter, _, ledger = scripted_gateway({"t-primary": "slow"})
    events = gw.generate(KEY, command(), Deadline.after(5))
    received = [await events.__anext__() for _ in range(5)]
    assert received == ["word "] * 5
    await events.aclose()  # what grpc.aio does when the client cancels
    await gw.aclose()
    [event] = ledger.events
    assert event.status == "cancelled" and event.output_tokens > 0 and event.cost_nano_usd > 0
    assert limiter.committed[event.request_id] == event.input_tokens + event.output_tokens


async def test_unknown_and_forbidden_models() -> None:
    gw, *_ = scripted_gateway({"t-primary": "ok"})
    with pytest.raises(InvalidArgument) as err:
        await run_collected(gw, command("nope", fallback_models=("also-nope",)))
    assert [v.field for v in err.value.violations] == ["input.model", "input.fallback_models[0]"]
    restricted = KeyRecord("k2", Principal("o", "t", "k2"), "member", ("backup",), None, False)
    with pytest.raises(PermissionDenied):
        gw.resolve_chain(restricted, command("primary"))


async def test_replicas_of_a_model_are_tried_before_the_next_model() -> None:
    replicated = ModelEntry("primary", "p", "t-a, t-b", 8192, "strong")
    cache, limiter, inference, ledger = MemoryCache(), MemoryLimiter(), ScriptedInference(
        {"t-a": "down", "t-b": "ok", "t-backup": "ok"}), Ledger()
    gw = Gateway(registry=registry_of(replicated, BACKUP), cache=cache, ratelimit=limiter, inference=inference,
                 usage=ledger, default_max_output_tokens=100, side_call_timeout_s=0.5)
    _, s = await run_collected(gw, command(fallback_models=("backup",)))
    assert s.model == "primary" and inference.calls == ["t-a", "t-b"]


async def test_auto_picks_the_cheap_tier() -> None:
    gw, *_ = scripted_gateway({"t-backup": "ok"})
    _, s = await run_collected(gw, command("auto"))
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
    gw = Gateway(registry=registry_of(PRIMARY, BACKUP), cache=MemoryCache(), ratelimit=MemoryLimiter(),
                 inference=inference, usage=Ledger(), default_max_output_tokens=100, side_call_timeout_s=0.5,
                 retrieval=retrieval)
    return gw, inference


async def test_retrieval_adds_sources_after_system_messages_and_returns_citations() -> None:
    retrieval = FakeRetrieval()
    gw, inference = _rag_gateway(retrieval)
    messages = [ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.USER, "capital of France?")]
    cmd = GenerateCommand(model="primary", params=GenerationParams(temperature=0.0), messages=messages,
                          retrieval=RetrievalPolicy(enabled=True))
    _, s = await run_collected(gw, cmd)
    assert retrieval.queries == [("org1", "capital of France?")]  # the key's tenant, never the caller's word
    prompt = inference.prompts[0]
    assert [m.role for m in prompt] == [Role.SYSTEM, Role.SYSTEM, Role.USER]
    assert "[1]" in prompt[1].content and "Paris is the capital of France." in prompt[1].content
    # Best chunk first, second best last: label 2 is doc2#3.
    assert s.cited_chunk_ids == ["doc2#3"] and not s.degraded


async def test_optional_retrieval_down_answers_without_context_marked_degraded() -> None:
    gw, inference = _rag_gateway(FakeRetrieval(down=True))
    _, s = await run_collected(gw, command(retrieval=RetrievalPolicy(enabled=True)))
    assert "retrieval_unavailable" in s.degraded_reasons and s.cited_chunk_ids == []
    assert len(inference.prompts[0]) == 1


async def test_required_retrieval_down_is_unavailable() -> None:
    gw, inference = _rag_gateway(FakeRetrieval(down=True))
    with pytest.raises(Unavailable, match="retrieval is required"):
        await run_collected(gw, command(retrieval=RetrievalPolicy(enabled=True, required=True)))
    assert not inference.calls
