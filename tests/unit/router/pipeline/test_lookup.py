"""LookupStage (services/router/pipeline/lookup.py): fail-open lookups, the hit rate, and serving a hit."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from libs.chat import ChatMessage, FinishReason, GenerationParams, TokenUsage
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, InvalidArgument, TollgateError, Unavailable
from services.router.control.pricing import Price
from services.router.control.registry import Registry, RegistrySnapshot
from services.router.pipeline.lookup import HIT_RATE_ALPHA, LookupStage
from services.router.pipeline.ports import CachedAnswer, CacheNamespace
from services.router.pipeline.request import CachePolicy, RequestState
from tests.support.router import BACKUP, KEY, PRIMARY, command, registry_of

NS = CacheNamespace("org1", "primary", "sph", "v1")
ANSWER = CachedAnswer("Paris.", TokenUsage(10, 3, 0), "primary", "semantic", False)


class RecordingCache:
    """Answers ``answer`` (or raises ``error``) and records every lookup's arguments."""

    def __init__(self, answer: CachedAnswer | None = ANSWER, error: BaseException | None = None) -> None:
        self.answer = answer
        self.error = error
        self.lookups: list[dict[str, Any]] = []

    async def lookup(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                     *, max_age_s: int, allow_stale: bool, exact_only: bool, deadline: Deadline,
                     price: Price | None = None) -> CachedAnswer | None:
        self.lookups.append(dict(ns=ns, model=model, messages=messages, params=params, max_age_s=max_age_s,
                                 allow_stale=allow_stale, exact_only=exact_only, deadline=deadline, price=price))
        if self.error is not None:
            raise self.error
        return self.answer

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None:
        raise AssertionError("a lookup stage never stores")


def _state(**kw: Any) -> RequestState:
    return RequestState.begin(KEY, command(**kw))


@pytest.mark.parametrize("error", [Unavailable("cache down"), DeadlineExceeded("slow"), InvalidArgument([], "odd")])
async def test_any_cache_error_fails_open(error: TollgateError) -> None:
    stage = LookupStage(RecordingCache(error=error), registry_of(PRIMARY), 0.5)
    assert await stage.lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False) is None


async def test_an_unexpected_error_is_not_swallowed() -> None:
    stage = LookupStage(RecordingCache(error=RuntimeError("bug")), registry_of(PRIMARY), 0.5)
    with pytest.raises(RuntimeError):
        await stage.lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False)


async def test_the_lookup_carries_the_commands_cache_policy_and_a_short_deadline() -> None:
    cache = RecordingCache()
    stage = LookupStage(cache, registry_of(PRIMARY), 0.25)
    state = _state(cache=CachePolicy(no_semantic=True, max_age_s=300))
    assert await stage.lookup(state, NS, PRIMARY, Deadline.after(5), allow_stale=True) == ANSWER
    [call] = cache.lookups
    assert call["ns"] == NS and call["model"] == "primary" and call["messages"] == state.cmd.messages
    assert call["max_age_s"] == 300 and call["exact_only"] is True and call["allow_stale"] is True
    assert 0 < call["deadline"].remaining() <= 0.25


async def test_the_price_sent_to_the_cache_is_the_models_price_when_the_request_started() -> None:
    registry = Registry(None, 60)
    registry.replace(RegistrySnapshot(models={"primary": PRIMARY}, prices={"primary": [
        Price(1, "primary", 100, 200, 0, datetime(2020, 1, 1, tzinfo=UTC)),
        Price(2, "primary", 900, 900, 0, datetime(2024, 6, 1, tzinfo=UTC))]}))
    cache = RecordingCache()
    stage = LookupStage(cache, registry, 0.5)
    state = _state()
    state.started_at = datetime(2024, 1, 1, tzinfo=UTC)
    await stage.lookup(state, NS, PRIMARY, Deadline.after(5), allow_stale=False)
    assert cache.lookups[0]["price"].version == 1


async def test_the_price_is_the_looked_up_models_not_the_one_the_state_holds() -> None:
    registry = registry_of(PRIMARY, BACKUP)  # primary is version 1, backup version 2
    cache = RecordingCache()
    state = _state()
    state.use_model(PRIMARY, registry)
    await LookupStage(cache, registry, 0.5).lookup(state, NS, BACKUP, Deadline.after(5), allow_stale=False)
    assert cache.lookups[0]["price"].version == 2 and cache.lookups[0]["model"] == "backup"


async def test_first_lookup_moves_the_hit_rate_as_a_moving_average() -> None:
    cache = RecordingCache()
    stage = LookupStage(cache, registry_of(PRIMARY), 0.5)
    assert stage.hit_rate == 0.0
    await stage.first_lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False)
    assert stage.hit_rate == pytest.approx(HIT_RATE_ALPHA) == pytest.approx(0.05)
    cache.answer = None
    await stage.first_lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False)
    assert stage.hit_rate == pytest.approx(0.05 * 0.95)
    cache.error = Unavailable("down")  # a failed lookup is a miss for the average
    await stage.first_lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False)
    assert stage.hit_rate == pytest.approx(0.05 * 0.95 * 0.95)


async def test_the_hit_rate_converges_and_other_lookups_leave_it_alone() -> None:
    cache = RecordingCache()
    stage = LookupStage(cache, registry_of(PRIMARY), 0.5)
    for _ in range(200):
        await stage.first_lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=False)
    assert 0.99 < stage.hit_rate <= 1.0
    before = stage.hit_rate
    cache.answer = None  # the fallback lookups (budget, no backend) are not first lookups
    await stage.lookup(_state(), NS, PRIMARY, Deadline.after(5), allow_stale=True)
    assert stage.hit_rate == before and len(cache.lookups) == 201


def test_serve_hit_answers_from_the_cache_at_no_cost_with_the_saving_priced() -> None:
    state = _state()
    state.use_model(PRIMARY, registry_of(PRIMARY))  # $1/M in, $2/M out
    state.text = ["partial "]
    LookupStage.serve_hit(state, ANSWER)
    assert state.cache_tier == "semantic" and state.text == ["Paris."]
    assert state.finish is FinishReason.STOP and state.provider == "cache"
    assert state.usage == TokenUsage(0, 0, 0) and state.billed_usage() == TokenUsage(0, 0, 0)
    assert state.saved_nano_usd == 10 * 1_000 + 3 * 2_000 == state.price.cost(ANSWER.usage)
    assert state.degraded == []


def test_a_free_model_saves_nothing() -> None:
    state = _state()
    LookupStage.serve_hit(state, ANSWER)
    assert state.saved_nano_usd == 0


def test_a_stale_hit_is_marked_degraded() -> None:
    state = _state()
    LookupStage.serve_hit(state, CachedAnswer("old", TokenUsage(1, 1, 0), "primary", "exact", True))
    assert state.cache_tier == "exact" and state.degraded == ["stale_cache"]
    assert state.degraded_detail == ["the cached answer is past its freshness"]
