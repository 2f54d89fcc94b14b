"""AccountStage (services/router/pipeline/account.py): the summary, and settling each request exactly once."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from libs.chat import ChatMessage, FinishReason, GenerationParams, TokenUsage
from libs.deadlines import Deadline
from libs.errors import QuotaExceeded, QuotaViolation, TollgateError, Unavailable
from libs.rag_context import ContextChunk, assemble_context
from services.router.control.limit_book import LimitBook, LimitSnapshot
from services.router.ledger.events import UsageEvent
from services.router.pipeline.account import AccountStage
from services.router.pipeline.degradation import Level
from services.router.pipeline.local_limits import LocalLimiter
from services.router.pipeline.ports import CachedAnswer, CacheNamespace, Reservation
from services.router.pipeline.request import RequestState
from tests.support.router import KEY, PRIMARY, Ledger, command, registry_of

NS = CacheNamespace("org1", "primary", "sph", "")


class RecordingLimiter:
    def __init__(self, *, commit_error: TollgateError | None = None) -> None:
        self.commit_error = commit_error
        self.commits: list[tuple[str, int, int]] = []
        self.releases: list[str] = []

    async def reserve(self, *args: object, **kwargs: object) -> Reservation:
        raise AssertionError("accounting never reserves")

    async def commit(self, reservation_id: str, actual_tokens: int, actual_cost_nano_usd: int,
                     deadline: Deadline) -> None:
        self.commits.append((reservation_id, actual_tokens, actual_cost_nano_usd))
        if self.commit_error is not None:
            raise self.commit_error

    async def release(self, reservation_id: str, deadline: Deadline) -> None:
        self.releases.append(reservation_id)


class RecordingCache:
    def __init__(self, *, store_error: TollgateError | None = None) -> None:
        self.store_error = store_error
        self.stores: list[tuple[CacheNamespace, str, str, TokenUsage]] = []

    async def lookup(self, *args: object, **kwargs: object) -> CachedAnswer | None:
        raise AssertionError("accounting never looks up")

    async def store(self, ns: CacheNamespace, model: str, messages: list[ChatMessage], params: GenerationParams,
                    content: str, usage: TokenUsage, deadline: Deadline) -> None:
        if self.store_error is not None:
            raise self.store_error
        self.stores.append((ns, model, content, usage))


class SlowLedger(Ledger):
    async def record(self, event: UsageEvent) -> None:
        await asyncio.sleep(0.05)
        await super().record(event)


def _account(limiter: RecordingLimiter | None = None, cache: RecordingCache | None = None,
             ledger: Ledger | None = None) -> tuple[AccountStage, RecordingLimiter, RecordingCache, Ledger]:
    limiter, cache, ledger = limiter or RecordingLimiter(), cache or RecordingCache(), ledger or Ledger()
    return AccountStage(limiter, cache, ledger), limiter, cache, ledger


def _generated(**kw: Any) -> RequestState:
    """A miss that generated "Paris is" with the engine's usage (10 in, 3 out) on primary ($1/M in, $2/M out)."""
    state = RequestState.begin(KEY, command(**kw), "req-1")
    state.use_model(PRIMARY, registry_of(PRIMARY))
    state.reservation = Reservation("res-1", False, False)
    state.text = ["Paris ", "is"]
    state.usage = TokenUsage(10, 3, 0)
    state.finish = FinishReason.STOP
    state.provider = "fake"
    return state


def _hit(state: RequestState) -> RequestState:
    state.cache_tier, state.text, state.usage, state.provider = "exact", ["Paris."], TokenUsage(0, 0, 0), "cache"
    state.saved_nano_usd = 16_000
    return state


async def _settle(account: AccountStage, state: RequestState) -> None:
    """Settle ``state`` and wait for it; a settlement that crashed fails the test (``aclose`` swallows it)."""
    before = asyncio.all_tasks()
    account.settle_later(state)
    settling = asyncio.all_tasks() - before
    assert len(settling) == 1
    await account.aclose()
    for task in settling:
        task.result()


# --- summary ------------------------------------------------------------------------------------

def test_the_summary_prices_the_billed_usage_at_the_requests_price() -> None:
    state = _generated()
    state.cache_tier, state.saved_nano_usd, state.attempts = "miss", 0, 2
    state.degrade("budget", "budget at 95 %")
    state.degrade("load", "busy")
    state.route_reason, state.variant, state.level = "auto: cheap tier", "exp/a", Level.CACHE_ONLY
    summary = AccountStage.summary(state)
    assert (summary.request_id, summary.model, summary.provider) == ("req-1", "primary", "fake")
    assert summary.usage == TokenUsage(10, 3, 0) and summary.cost_nano_usd == 10 * 1_000 + 3 * 2_000
    assert summary.price_version == 1 and summary.finish_reason is FinishReason.STOP
    assert summary.degraded_reasons == ["budget", "load"] and summary.degraded
    assert summary.degraded_detail == "budget at 95 %; busy" and summary.degradation_level == "cache_only"
    assert (summary.route_reason, summary.attempts, summary.variant) == ("auto: cheap tier", 2, "exp/a")
    assert summary.cited_chunk_ids == [] and summary.latency_s >= 0
    state.degrade("stale_cache", "")
    assert summary.degraded_reasons == ["budget", "load"]  # a copy, not the state's list


def test_the_summary_of_a_cut_off_answer_prices_the_estimate() -> None:
    state = _generated()
    state.usage, state.finish, state.counted_output_tokens = None, None, 7
    summary = AccountStage.summary(state)
    prompt = state.prompt_tokens()
    assert summary.usage == TokenUsage(prompt, 7, 0) and summary.cost_nano_usd == prompt * 1_000 + 7 * 2_000
    assert summary.finish_reason is FinishReason.STOP and summary.degradation_level == "full"


def test_the_summary_cites_the_chunks_the_answer_names_when_there_was_context() -> None:
    state = _generated()
    state.context = assemble_context([ContextChunk("doc1#0", "doc1", "Paris is the capital.", 0.9),
                                      ContextChunk("doc2#3", "doc2", "France is in Europe.", 0.5)], 2000)
    state.text = ["Paris [2]", " and [1][7]."]
    assert AccountStage.summary(state).cited_chunk_ids == ["doc2#3", "doc1#0"]


def test_the_summary_of_a_hit_costs_nothing_and_keeps_the_saving() -> None:
    summary = AccountStage.summary(_hit(_generated()))
    assert summary.cost_nano_usd == 0 and summary.saved_nano_usd == 16_000 and summary.cache_tier == "exact"


# --- settle: the reservation --------------------------------------------------------------------

async def test_a_generated_miss_commits_its_real_tokens_and_cost() -> None:
    account, limiter, _, _ = _account()
    await _settle(account, _generated())
    assert limiter.commits == [("res-1", 13, 16_000)] and limiter.releases == []


async def test_a_cut_off_miss_commits_what_was_generated() -> None:
    account, limiter, _, _ = _account()
    state = _generated()
    state.usage, state.counted_output_tokens = None, 4
    prompt = state.prompt_tokens()
    await _settle(account, state)
    assert limiter.commits == [("res-1", prompt + 4, prompt * 1_000 + 4 * 2_000)]


async def test_a_hit_releases_its_reservation() -> None:
    account, limiter, _, _ = _account()
    await _settle(account, _hit(_generated()))
    assert limiter.releases == ["res-1"] and limiter.commits == []


async def test_a_failure_with_no_output_releases_its_reservation() -> None:
    account, limiter, _, ledger = _account()
    state = _generated()
    state.text, state.usage, state.finish = [], None, None
    state.end_with(Unavailable("no backend", reason="NO_BACKEND"))
    await _settle(account, state)
    assert limiter.releases == ["res-1"] and limiter.commits == []
    [event] = ledger.events
    assert (event.status, event.error_reason, event.cost_nano_usd, event.output_tokens) == ("error", "NO_BACKEND", 0, 0)


async def test_without_a_reservation_nothing_is_committed_or_released() -> None:
    account, limiter, _, ledger = _account()
    state = _generated()
    state.reservation = None  # the limiter was unreachable: admitted unreserved
    await _settle(account, state)
    assert limiter.commits == [] and limiter.releases == [] and len(ledger.events) == 1


async def test_a_limiter_error_on_commit_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    account, limiter, _, ledger = _account(RecordingLimiter(commit_error=Unavailable("ratelimit down")))
    with caplog.at_level(logging.WARNING, logger="services.router.pipeline.account"):
        await _settle(account, _generated())
    assert limiter.commits == [("res-1", 13, 16_000)]
    assert "req-1 not settled: UNAVAILABLE" in caplog.text
    assert len(ledger.events) == 1  # the usage is still recorded


# --- settle: the cache --------------------------------------------------------------------------

async def test_a_fresh_answer_is_stored_only_when_the_gateway_asked_for_it() -> None:
    account, _, cache, _ = _account()
    await _settle(account, _generated())
    assert cache.stores == []
    state = _generated()
    state.store_ns = NS
    await _settle(account, state)
    assert cache.stores == [(NS, "primary", "Paris is", TokenUsage(10, 3, 0))]


async def test_a_failed_store_is_logged_and_the_usage_still_recorded(caplog: pytest.LogCaptureFixture) -> None:
    account, limiter, _, ledger = _account(cache=RecordingCache(store_error=Unavailable("cache down")))
    state = _generated()
    state.store_ns = NS
    with caplog.at_level(logging.WARNING, logger="services.router.pipeline.account"):
        await _settle(account, state)
    assert "cache store skipped: UNAVAILABLE" in caplog.text
    assert limiter.commits and len(ledger.events) == 1


# --- settle: the ledger -------------------------------------------------------------------------

async def test_exactly_one_usage_event_records_how_the_request_went() -> None:
    account, _, _, ledger = _account()
    state = _generated(labels={"team": "search"})
    state.variant = "exp/b"
    state.degrade("load", "busy")
    await _settle(account, state)
    [event] = ledger.events
    assert (event.request_id, event.org_id, event.team_id, event.key_id) == ("req-1", "org1", "team1", "k1")
    assert (event.model, event.provider, event.cache_tier) == ("primary", "fake", "miss")
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (10, 3, 0)
    assert (event.cost_nano_usd, event.saved_nano_usd, event.price_version) == (16_000, 0, 1)
    assert (event.status, event.error_reason, event.degraded) == ("ok", "", True)
    assert event.labels == {"team": "search"} and event.variant == "exp/b"
    assert event.started_at == state.started_at and event.finished_at >= event.started_at
    assert event.latency_ms >= 0


async def test_a_rejected_request_records_its_status_and_reason() -> None:
    account, _, _, ledger = _account()
    state = RequestState.begin(KEY, command(), "req-2")
    state.use_model(PRIMARY, registry_of(PRIMARY))
    state.end_with(QuotaExceeded("over", [QuotaViolation("key:k1", "tpm")], 3.0))
    await _settle(account, state)
    [event] = ledger.events
    assert (event.status, event.error_reason, event.cost_nano_usd, event.degraded) == (
        "rejected", "QUOTA_EXCEEDED", 0, False)


async def test_an_unpriced_request_records_no_price_version() -> None:
    account, _, _, ledger = _account()
    state = RequestState.begin(KEY, command())
    state.model, state.text, state.usage = PRIMARY, ["x"], TokenUsage(5, 1, 0)  # never priced: FREE
    await _settle(account, state)
    assert ledger.events[0].price_version is None and ledger.events[0].cost_nano_usd == 0


async def test_nothing_is_recorded_when_no_model_was_chosen() -> None:
    account, limiter, cache, ledger = _account()
    state = RequestState.begin(KEY, command())
    state.reservation = Reservation("res-9", False, False)
    state.store_ns = NS
    state.end_with(QuotaExceeded("over", [QuotaViolation("key:k1", "tpm")], 3.0))
    await _settle(account, state)
    assert ledger.events == [] and cache.stores == [] and limiter.releases == ["res-9"]


async def test_aclose_waits_for_pending_settlements() -> None:
    account, _, _, ledger = _account(ledger=SlowLedger())
    account.settle_later(_generated())
    account.settle_later(_hit(_generated()))
    await asyncio.sleep(0)
    assert ledger.events == []
    await account.aclose()
    assert [e.cache_tier for e in ledger.events] == ["miss", "exact"]
    await account.aclose()  # nothing pending: returns at once


# --- a reservation still in flight --------------------------------------------------------------

async def test_a_reservation_in_flight_when_a_hit_answered_is_awaited_then_released() -> None:
    account, limiter, _, ledger = _account()
    state = _hit(_generated())
    state.reservation = None

    async def reserving() -> None:
        await asyncio.sleep(0.05)
        state.reservation = Reservation("res-late", False, False)

    state.reserving = asyncio.ensure_future(reserving())
    await _settle(account, state)
    assert state.reserving.done() and limiter.releases == ["res-late"] and limiter.commits == []
    assert len(ledger.events) == 1


async def test_a_refused_reservation_in_flight_is_not_settled_and_not_raised() -> None:
    account, limiter, _, ledger = _account()
    state = _hit(_generated())
    state.reservation = None

    async def refused() -> None:
        await asyncio.sleep(0.01)
        raise QuotaExceeded("over", [QuotaViolation("key:k1", "tpm")], 3.0)

    state.reserving = asyncio.ensure_future(refused())
    await _settle(account, state)
    assert limiter.releases == [] and limiter.commits == [] and len(ledger.events) == 1


# --- settle: this router's own record (the local limiter's carry-over) -------------------------------

def _recording_local() -> LocalLimiter:
    book = LimitBook(None, 1.0)
    key = ("key", KEY.principal.key_id)
    book.replace(LimitSnapshot({key: (10, 1000, 0)}, {key: (10**9, 0)}))
    return LocalLimiter(book)


async def test_a_commit_replaces_the_local_estimate_with_the_actual_figures() -> None:
    local = _recording_local()
    limiter, cache, ledger = RecordingLimiter(), RecordingCache(), Ledger()
    account = AccountStage(limiter, cache, ledger, local)
    state = _generated()
    state.local_hold = local.record(KEY.principal, 500, 900_000)
    await _settle(account, state)
    used = local.used("key", "k1")
    assert (used["requests_per_minute"], used["tokens_per_minute"], used["daily_nano_usd"]) == (1, 13, 16_000)


async def test_a_hit_or_a_locally_admitted_failure_gives_the_local_record_back() -> None:
    local = _recording_local()
    account = AccountStage(RecordingLimiter(), RecordingCache(), Ledger(), local)
    state = _hit(_generated())
    state.reservation = None  # admitted by the local limiter
    state.local_hold = local.admit(KEY.principal, 500, 900_000)
    await _settle(account, state)
    used = local.used("key", "k1")
    assert (used["requests_per_minute"], used["tokens_per_minute"], used["daily_nano_usd"]) == (0, 0, 0)
