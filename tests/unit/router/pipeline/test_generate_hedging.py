"""GenerateStage hedging (services/router/pipeline/generate.py with services/router/pipeline/hedging.py): a
second attempt when the first sends no token within the hedge delay, the race for the first chunk, the loser
cancelled, only the winner billed."""

from __future__ import annotations

import time
from typing import Any

import pytest

from libs.chat import FinishReason, TokenUsage
from libs.deadlines import Deadline
from libs.errors import PermissionDenied, Unavailable
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.failover import RetryPolicy, RouteTimeouts
from services.router.pipeline.gateway import Gateway
from services.router.pipeline.generate import GenerateStage
from services.router.pipeline.hedging import HedgePolicy, Hedger
from services.router.pipeline.request import RequestState, Summary
from services.router.pipeline.route import RouteStage
from tests.support.router import (
    BACKUP,
    KEY,
    PRIMARY,
    Backends,
    Ledger,
    MemoryCache,
    MemoryLimiter,
    command,
    registry_of,
)

REPLICATED = ModelEntry("primary", "p", "t-a, t-b", 8192, "strong")
# The first-token timeout is far away: whatever answers early here, hedging made it so.
SLOW_TIMEOUTS = RetryPolicy(first_token_timeout_s=5.0, stall_timeout_s=5.0)
DELAY = 0.05


def _hedger(**kw: Any) -> Hedger:
    return Hedger(HedgePolicy(**{"floor_s": DELAY, "default_delay_s": DELAY, **kw}))


def _stage(backends: Backends, hedger: Hedger | None, registry: Registry | None = None, *,
           retry: RetryPolicy = SLOW_TIMEOUTS) -> GenerateStage:
    registry = registry or registry_of(REPLICATED, BACKUP)
    admit = AdmitStage(MemoryLimiter(), default_max_output_tokens=100, side_timeout_s=0.5)
    return GenerateStage(backends, registry, RouteStage(registry), admit, retry=retry, default_max_output_tokens=100,
                         hedger=hedger)


async def _drain(stage: GenerateStage, state: RequestState, chain: list[ModelEntry]) -> list[str]:
    return [d async for d in stage.through_chain(state, chain, Deadline.after(10))]


def _state() -> RequestState:
    return RequestState.begin(KEY, command())


def _gap(backends: Backends) -> float:
    """Seconds between the first and the second call."""
    return backends.calls[1][2] - backends.calls[0][2]


# --- the race -----------------------------------------------------------------------------------

async def test_a_hung_replica_is_hedged_after_the_delay_and_the_other_replica_answers() -> None:
    backends = Backends({"t-a": ["hang"], "t-b": ["ok"]})
    state = _state()
    t0 = time.monotonic()
    deltas = await _drain(_stage(backends, _hedger()), state, [REPLICATED, BACKUP])
    assert deltas == ["Par", "is"] and backends.targets() == ["t-a", "t-b"]  # the same model's other replica
    assert backends.calls[1][2] - t0 >= DELAY and _gap(backends) < DELAY + 0.2  # hedged after the delay
    assert time.monotonic() - t0 < 1.0  # far below the 5 s first-token timeout
    assert backends.cancelled == ["t-a"]  # the loser's call saw its cancellation
    assert backends.faults == []  # ... and is no breaker fault: it was cancelled before its own timeout
    assert state.provider == "prov-t-b" and state.usage == TokenUsage(9, 2, 0) and state.counted_output_tokens == 2
    assert state.attempts == 2 and state.model is REPLICATED and "hedged: primary" in state.route_reason


async def test_with_one_replica_live_the_hedge_goes_to_the_next_model_of_the_chain() -> None:
    backends = Backends({"t-primary": ["hang"], "t-backup": ["ok"]})
    state = _state()
    deltas = await _drain(_stage(backends, _hedger(), registry_of(PRIMARY, BACKUP)), state, [PRIMARY, BACKUP])
    assert deltas == ["Par", "is"] and backends.targets() == ["t-primary", "t-backup"]
    assert _gap(backends) < DELAY + 0.2 and backends.cancelled == ["t-primary"] and backends.faults == []
    assert state.model is BACKUP and state.price.version == 2  # priced as the winner's model


async def test_the_first_attempt_wins_when_its_token_comes_before_the_hedges() -> None:
    backends = Backends({"t-a": ["late"], "t-b": ["late"]}, late_s={"t-a": 0.15, "t-b": 0.5})
    state = _state()
    t0 = time.monotonic()
    assert await _drain(_stage(backends, _hedger()), state, [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a", "t-b"] and backends.cancelled == ["t-b"]
    assert state.provider == "prov-t-a" and state.attempts == 2 and time.monotonic() - t0 < 0.4


async def test_a_hedge_that_fails_leaves_the_first_attempt_racing_alone() -> None:
    backends = Backends({"t-a": ["late"], "t-b": ["down"]}, late_s={"t-a": 0.15})
    state = _state()
    assert await _drain(_stage(backends, _hedger()), state, [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a", "t-b"] and state.provider == "prov-t-a" and backends.cancelled == []


async def test_when_both_racers_fail_the_next_candidate_is_tried() -> None:
    backends = Backends({"t-a": ["hang"], "t-b": ["down"], "t-backup": ["ok"]})
    retry = RetryPolicy(first_token_timeout_s=0.2, stall_timeout_s=5.0)
    state = _state()
    assert await _drain(_stage(backends, _hedger(), retry=retry), state, [REPLICATED, BACKUP]) == ["Par", "is"]
    assert backends.targets() == ["t-a", "t-b", "t-backup"] and state.attempts == 3
    assert backends.faults == [("t-a", "BACKEND_TIMEOUT")] and state.model is BACKUP


async def test_a_final_error_from_the_hedge_ends_the_request_and_cancels_the_first_attempt() -> None:
    backends = Backends({"t-a": ["hang"], "t-b": ["denied"]})
    with pytest.raises(PermissionDenied):
        await _drain(_stage(backends, _hedger()), _state(), [REPLICATED])
    assert backends.targets() == ["t-a", "t-b"] and backends.cancelled == ["t-a"]


async def test_a_loser_past_its_own_first_token_timeout_is_counted_as_a_fault() -> None:
    # t-a hangs past its 0.1 s first-token timeout while the hedge (t-b, asked at 0.05 s, answering at 0.13 s) works.
    backends = Backends({"t-a": ["hang"], "t-b": ["late"]}, late_s={"t-b": 0.08})
    retry = RetryPolicy(first_token_timeout_s=0.1, stall_timeout_s=5.0)
    state = _state()
    assert await _drain(_stage(backends, _hedger(), retry=retry), state, [REPLICATED]) == ["Par", "is"]
    assert backends.faults == [("t-a", "BACKEND_TIMEOUT")] and state.provider == "prov-t-b"


async def test_a_replica_that_lost_a_race_is_tried_after_its_peers_for_a_while() -> None:
    backends = Backends({"t-a": ["hang", "ok"], "t-b": ["ok"]})
    hedger = _hedger(demote_s=60)
    await _drain(_stage(backends, hedger), _state(), [REPLICATED])
    state = _state()
    await _drain(_stage(backends, hedger), state, [REPLICATED])
    assert backends.targets() == ["t-a", "t-b", "t-b"] and state.attempts == 1  # t-b first now


# --- when there is no hedge ---------------------------------------------------------------------

async def test_no_hedge_with_one_candidate_live() -> None:
    backends = Backends({"t-primary": ["late"]}, late_s={"t-primary": 0.2})
    state = _state()
    assert await _drain(_stage(backends, _hedger(), registry_of(PRIMARY)), state, [PRIMARY]) == ["Par", "is"]
    assert backends.targets() == ["t-primary"] and state.attempts == 1 and "hedged" not in state.route_reason


async def test_no_hedge_when_the_attempt_budget_is_spent() -> None:
    backends = Backends({"t-a": ["late"], "t-b": ["ok"]}, late_s={"t-a": 0.2})
    retry = RetryPolicy(max_attempts=1, first_token_timeout_s=5.0)
    state = _state()
    assert await _drain(_stage(backends, _hedger(), retry=retry), state, [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a"] and state.attempts == 1


async def test_no_hedge_once_the_hedge_budget_of_the_window_is_spent() -> None:
    backends = Backends({"t-a": ["hang"], "t-b": ["ok"]})
    # A 10 % share of two requests is less than one hedge: one (the minimum) per window, then none.
    hedger = _hedger(max_share=0.1, window_s=60, demote_s=0)
    retry = RetryPolicy(first_token_timeout_s=0.3, stall_timeout_s=5.0)
    first = _state()
    await _drain(_stage(backends, hedger, retry=retry), first, [REPLICATED])
    assert _gap(backends) < 0.2 and backends.faults == []  # hedged
    second = _state()
    t0 = time.monotonic()
    assert await _drain(_stage(backends, hedger, retry=retry), second, [REPLICATED]) == ["Par", "is"]
    assert time.monotonic() - t0 >= 0.3  # not hedged: waited out t-a's first-token timeout, then failed over
    assert backends.targets() == ["t-a", "t-b", "t-a", "t-b"] and backends.faults == [("t-a", "BACKEND_TIMEOUT")]
    assert "hedged" not in second.route_reason


async def test_no_hedge_without_a_hedger() -> None:
    backends = Backends({"t-a": ["late"], "t-b": ["ok"]}, late_s={"t-a": 0.15})
    assert await _drain(_stage(backends, None), _state(), [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a"]


async def test_a_stream_that_sent_a_token_is_never_hedged() -> None:
    backends = Backends({"t-a": ["stall"], "t-b": ["ok"]})
    retry = RetryPolicy(first_token_timeout_s=5.0, stall_timeout_s=0.3)
    received: list[str] = []
    with pytest.raises(Unavailable, match="stalled"):
        async for delta in _stage(backends, _hedger(), retry=retry).through_chain(_state(), [REPLICATED],
                                                                                    Deadline.after(5)):
            received.append(delta)
    assert received == ["Par"] and backends.targets() == ["t-a"]


# --- the delay ----------------------------------------------------------------------------------

async def test_the_delay_follows_the_models_observed_first_token_latencies() -> None:
    # Every first token of this model takes ~0.2 s: learned, the delay is p95 x 1.5 = 0.3 s, and a 0.2 s first
    # token is not hedged. With no history (the 0.05 s default) the same request is.
    learned = _hedger(factor=1.5, min_samples=5)
    for _ in range(5):
        learned.observe_first_token("primary", 0.2)
    backends = Backends({"t-a": ["late"], "t-b": ["ok"]}, late_s={"t-a": 0.2})
    assert await _drain(_stage(backends, learned), _state(), [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a"]
    fresh = Backends({"t-a": ["late"], "t-b": ["ok"]}, late_s={"t-a": 0.2})
    await _drain(_stage(fresh, _hedger(min_samples=5)), _state(), [REPLICATED])
    assert fresh.targets() == ["t-a", "t-b"]


async def test_the_winners_first_token_latency_is_what_the_delay_learns() -> None:
    hedger = _hedger(min_samples=1, factor=1.0, floor_s=0.01)
    backends = Backends({"t-a": ["late"], "t-b": ["late"]}, late_s={"t-a": 0.1, "t-b": 0.1})
    await _drain(_stage(backends, hedger, registry_of(REPLICATED)), _state(), [REPLICATED])
    assert 0.09 <= hedger.delay("primary") < 0.2


async def test_a_routes_hedge_floor_replaces_the_policys() -> None:
    backends = Backends({"t-a": ["late"], "t-b": ["ok"]}, late_s={"t-a": 0.15})
    retry = RetryPolicy(first_token_timeout_s=5.0, routes={"primary": RouteTimeouts(hedge_floor_s=0.5)})
    assert await _drain(_stage(backends, _hedger(), retry=retry), _state(), [REPLICATED]) == ["Par", "is"]
    assert backends.targets() == ["t-a"]  # 0.15 s is under the route's 0.5 s floor


# --- billing: the winner only -------------------------------------------------------------------

async def test_a_hedged_request_is_billed_and_ledgered_once_for_the_winner() -> None:
    backends = Backends({"t-a": ["hang"], "t-b": ["ok"]})
    limiter, ledger = MemoryLimiter(), Ledger()
    gw = Gateway(registry=registry_of(REPLICATED, BACKUP), cache=MemoryCache(), ratelimit=limiter,
                 inference=backends, usage=ledger, default_max_output_tokens=100, side_call_timeout_s=0.5,
                 retry=SLOW_TIMEOUTS, hedger=_hedger())
    summary = None
    async for event in gw.generate(KEY, command(), Deadline.after(5)):
        if isinstance(event, Summary):
            summary = event
    await gw.aclose()
    assert summary is not None and summary.attempts == 2 and summary.provider == "prov-t-b"
    assert summary.usage == TokenUsage(9, 2, 0) and summary.finish_reason is FinishReason.STOP
    assert summary.cost_nano_usd == 9 * 1_000 + 2 * 2_000  # PRICE per token, the winner's usage only
    assert limiter.committed == {summary.request_id: 11} and limiter.released == []
    assert len(ledger.events) == 1
    row = ledger.events[0]
    assert (row.input_tokens, row.output_tokens, row.provider) == (9, 2, "prov-t-b")
    assert backends.cancelled == ["t-a"]
