"""GenerateStage (services/router/pipeline/generate.py): streaming from the chain with failover and retries."""

from __future__ import annotations

import time
from typing import Any

import pytest

from libs.chat import FinishReason, GenerationParams, TokenUsage
from libs.deadlines import Deadline
from libs.errors import (
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from services.router.control.registry import ModelEntry, Registry
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.degradation import DegradationController, DegradationPolicy, Level
from services.router.pipeline.failover import CONTEXT_WINDOW_EXCEEDED, RetryPolicy, RouteTimeouts
from services.router.pipeline.generate import GenerateStage
from services.router.pipeline.request import GenerateCommand, RequestState
from services.router.pipeline.route import RouteStage
from tests.support.router import BACKUP, KEY, PRIMARY, Backends, MemoryLimiter, command, registry_of

DEFAULT_MAX_OUTPUT = 100


def _stage(backends: Backends, registry: Registry | None = None, *, retry: RetryPolicy = RetryPolicy(),
           controller: DegradationController | None = None) -> GenerateStage:
    registry = registry or registry_of(PRIMARY, BACKUP)
    admit = AdmitStage(MemoryLimiter(), default_max_output_tokens=DEFAULT_MAX_OUTPUT, side_timeout_s=0.5,
                       degradation=controller)
    return GenerateStage(backends, registry, RouteStage(registry), admit, retry=retry,
                         default_max_output_tokens=DEFAULT_MAX_OUTPUT)


def _controller(min_samples: int = 2) -> DegradationController:
    return DegradationController(DegradationPolicy(min_samples=min_samples, recover_s=60))


async def _drain(stage: GenerateStage, state: RequestState, chain: list[ModelEntry],
                 deadline: Deadline | None = None) -> list[str]:
    return [d async for d in stage.through_chain(state, chain, deadline or Deadline.after(5))]


def _state(**kw: Any) -> RequestState:
    return RequestState.begin(KEY, command(**kw))


REPLICATED = ModelEntry("primary", "p", "t-a, t-b", 8192, "strong")


# --- the happy path -----------------------------------------------------------------------------

async def test_the_first_healthy_replica_answers_and_fills_the_state() -> None:
    backends = Backends({"t-a": ["ok"], "t-b": ["ok"]}, cooling={"t-a": time.monotonic() + 60})
    registry = registry_of(REPLICATED, BACKUP)
    state = _state()
    deltas = await _drain(_stage(backends, registry), state, [REPLICATED, BACKUP])
    assert deltas == ["Par", "is"] and backends.targets() == ["t-b"]
    assert state.text == ["Par", "is"] and state.finish is FinishReason.STOP
    assert state.usage == TokenUsage(9, 2, 0) and state.provider == "prov-t-b" and state.counted_output_tokens == 2
    assert state.model is REPLICATED and state.price.version == 1 and state.attempts == 1


async def test_the_commands_params_go_to_the_backend_with_the_default_output_cap() -> None:
    backends = Backends({"t-primary": ["ok"]})
    await _drain(_stage(backends), _state(temperature=0.3), [PRIMARY])
    capped = GenerationParams(temperature=0.3, max_output_tokens=50)
    assert backends.params == [capped]  # the command's own cap is kept
    backends = Backends({"t-primary": ["ok"]})
    uncapped = GenerateCommand(model="primary", messages=command().messages,
                               params=GenerationParams(temperature=0.3, seed=7))
    await _drain(_stage(backends), RequestState.begin(KEY, uncapped), [PRIMARY])
    assert backends.params == [GenerationParams(temperature=0.3, max_output_tokens=DEFAULT_MAX_OUTPUT, seed=7)]


async def test_a_success_is_reported_to_the_degradation_controller() -> None:
    controller = _controller(min_samples=4)
    controller.record(failed=True)
    for _ in range(3):
        await _drain(_stage(Backends({"t-primary": ["ok"]}), controller=controller), _state(), [PRIMARY])
    assert controller.evaluate() is Level.REDUCED  # 1 failure in 4 outcomes: the 3 successes were counted


# --- failover -----------------------------------------------------------------------------------

async def test_a_retryable_failure_moves_on_to_the_next_candidate_at_once() -> None:
    backends = Backends({"t-primary": ["down"], "t-backup": ["ok"]})
    controller = _controller()
    state = _state()
    t0 = time.monotonic()
    deltas = await _drain(_stage(backends, controller=controller), state, [PRIMARY, BACKUP])
    assert deltas == ["Par", "is"] and backends.targets() == ["t-primary", "t-backup"]
    assert state.model is BACKUP and state.price.version == 2 and state.attempts == 2
    assert backends.calls[1][2] - t0 < 0.05  # no backoff between candidates of one round
    assert controller.evaluate() is Level.REDUCED  # 1 fault in 2 outcomes (50 %): both were recorded


@pytest.mark.parametrize("mode", ["429", "busy"])
async def test_a_rate_limit_or_full_replica_is_not_a_backend_fault(mode: str) -> None:
    controller = _controller()
    state = _state()
    await _drain(_stage(Backends({"t-primary": [mode], "t-backup": ["ok"]}), controller=controller), state,
                 [PRIMARY, BACKUP])
    controller.record(failed=False)
    assert state.model is BACKUP and controller.evaluate() is Level.FULL  # two successes, no failure


async def test_a_non_retryable_error_is_final() -> None:
    backends = Backends({"t-primary": ["denied"], "t-backup": ["ok"]})
    state = _state()
    with pytest.raises(PermissionDenied):
        await _drain(_stage(backends), state, [PRIMARY, BACKUP])
    assert backends.targets() == ["t-primary"] and state.attempts == 1


async def test_a_failure_after_a_delta_is_final() -> None:
    backends = Backends({"t-primary": ["partial"], "t-backup": ["ok"]})
    state = _state()
    received: list[str] = []
    with pytest.raises(Unavailable, match="connection reset"):
        async for delta in _stage(backends).through_chain(state, [PRIMARY, BACKUP], Deadline.after(5)):
            received.append(delta)
    assert received == ["Par"] and state.text == ["Par"] and state.finish is None
    assert backends.targets() == ["t-primary"]


async def test_a_context_overflow_drops_the_model_for_a_larger_one() -> None:
    small = ModelEntry("small", "p", "t-small, t-small-2", 2000, "cheap")
    large = ModelEntry("large", "p", "t-large", 100_000, "cheap")
    backends = Backends({"t-small": ["overflow"], "t-small-2": ["ok"], "t-large": ["ok"]})
    controller = _controller()
    state = _state()
    await _drain(_stage(backends, registry_of(small, large), controller=controller), state, [small])
    assert backends.targets() == ["t-small", "t-large"]  # not the other replica of the model that overflowed
    assert state.model is large and "small overflowed -> large" in state.route_reason
    controller.record(failed=False)
    assert controller.evaluate() is Level.FULL  # an overflow is not a backend fault


async def test_a_backend_overflow_with_no_larger_model_is_refused_as_too_long() -> None:
    only = ModelEntry("only", "p", "t-only", 2000, "cheap")
    backends = Backends({"t-only": ["overflow"]})
    with pytest.raises(InvalidArgument) as err:
        await _drain(_stage(backends, registry_of(only)), _state(), [only])
    assert err.value.reason == CONTEXT_WINDOW_EXCEEDED and backends.targets() == ["t-only"]


async def test_a_prompt_that_fits_no_model_is_refused_before_any_call() -> None:
    small = ModelEntry("small", "p", "t-small", 8, "cheap")
    backends = Backends({"t-small": ["ok"]})
    with pytest.raises(InvalidArgument) as err:
        await _drain(_stage(backends, registry_of(small)), _state(), [small])
    assert err.value.reason == CONTEXT_WINDOW_EXCEEDED and backends.calls == []


# --- the attempt budget and retry rounds --------------------------------------------------------

async def test_max_attempts_bounds_the_calls_and_leaves_the_state_unfinished() -> None:
    backends = Backends({"t-primary": ["down"], "t-backup": ["down"]})
    state = _state()
    deltas = await _drain(_stage(backends, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01)), state,
                          [PRIMARY, BACKUP])
    assert deltas == [] and backends.targets() == ["t-primary", "t-backup", "t-primary"]
    assert state.attempts == 3 and state.finish is None and state.text == []


async def test_a_later_round_retries_after_a_backoff() -> None:
    backends = Backends({"t-primary": ["down", "ok"]})
    state = _state()
    await _drain(_stage(backends, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.01)), state, [PRIMARY])
    assert backends.targets() == ["t-primary", "t-primary"] and state.finish is FinishReason.STOP
    assert state.attempts == 2


async def test_a_whole_round_of_retry_afters_is_honoured() -> None:
    backends = Backends({"t-primary": ["hint", "ok"]})
    await _drain(_stage(backends, retry=RetryPolicy(max_attempts=3, backoff_base_s=0.001)), _state(), [PRIMARY])
    (_, _, first), (_, _, second) = backends.calls
    assert second - first >= 0.095  # the backend's 0.1 s, not the 1 ms backoff


async def test_no_retry_round_is_started_past_the_deadline() -> None:
    backends = Backends({"t-primary": ["hint"]})
    state = _state()
    t0 = time.monotonic()
    deltas = await _drain(_stage(backends, retry=RetryPolicy(max_attempts=4, min_attempt_s=0.02)), state, [PRIMARY],
                          Deadline.after(0.1))  # 0.1 s retry-after + 0.02 s attempt do not fit
    assert deltas == [] and len(backends.calls) == 1 and state.attempts == 1
    assert time.monotonic() - t0 < 0.05  # gave up at once rather than sleeping


async def test_with_every_replica_cooling_the_round_waits_for_the_first_to_come_back() -> None:
    backends = Backends({"t-primary": ["ok"]}, cooling={"t-primary": time.monotonic() + 0.1})
    state = _state()
    t0 = time.monotonic()
    await _drain(_stage(backends, retry=RetryPolicy(max_attempts=2, backoff_base_s=0.001)), state, [PRIMARY])
    assert backends.targets() == ["t-primary"] and backends.calls[0][2] - t0 >= 0.095
    assert backends.orders == 2  # one wait for the replica, not a string of short backoffs
    assert state.attempts == 1 and state.finish is FinishReason.STOP


async def test_with_nothing_callable_and_nothing_cooling_it_gives_up() -> None:
    backends = Backends({"t-primary": ["ok"]}, open_breakers=["t-primary"])
    state = _state()
    assert await _drain(_stage(backends), state, [PRIMARY]) == [] and state.attempts == 0


# --- cool-downs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["429", "busy"])
async def test_a_429_or_full_replica_cools_the_target_for_its_retry_after(mode: str) -> None:
    backends = Backends({"t-primary": [mode], "t-backup": ["ok"]})
    await _drain(_stage(backends), _state(), [PRIMARY, BACKUP])
    assert backends.cool_downs == [("t-primary", 0.1)]


async def test_an_unavailable_backend_with_a_hint_is_not_cooled_down() -> None:
    backends = Backends({"t-primary": ["hint"], "t-backup": ["ok"]})
    await _drain(_stage(backends), _state(), [PRIMARY, BACKUP])
    assert backends.cool_downs == [] and backends.targets() == ["t-primary", "t-backup"]


# --- hung backends (issue 24) -------------------------------------------------------------------

HANG_RETRY = RetryPolicy(first_token_timeout_s=0.05, stall_timeout_s=0.05)


async def test_no_first_token_in_time_cancels_the_call_counts_a_fault_and_fails_over() -> None:
    backends = Backends({"t-primary": ["hang"], "t-backup": ["ok"]})
    controller = _controller()
    state = _state()
    t0 = time.monotonic()
    deltas = await _drain(_stage(backends, retry=HANG_RETRY, controller=controller), state, [PRIMARY, BACKUP])
    elapsed = time.monotonic() - t0
    assert deltas == ["Par", "is"] and backends.targets() == ["t-primary", "t-backup"]
    assert backends.cancelled == ["t-primary"]  # the hung call saw its cancellation
    assert backends.faults == [("t-primary", "BACKEND_TIMEOUT")]  # counted against its breaker
    assert state.attempts == 2 and state.model is BACKUP and "no first token" in state.route_reason
    assert controller.evaluate() is Level.REDUCED  # the timeout was reported to degradation too
    assert 0.04 < elapsed < 0.5


async def test_every_candidate_hanging_spends_the_attempts_and_leaves_the_state_unfinished() -> None:
    backends = Backends({"t-primary": ["hang"], "t-backup": ["hang"]})
    state = _state()
    retry = RetryPolicy(max_attempts=3, backoff_base_s=0.0, first_token_timeout_s=0.03, stall_timeout_s=0.03)
    assert await _drain(_stage(backends, retry=retry), state, [PRIMARY, BACKUP]) == []
    assert state.attempts == 3 and state.finish is None and len(backends.cancelled) == 3
    assert [t for t, _ in backends.faults] == ["t-primary", "t-backup", "t-primary"]


async def test_a_stall_after_a_delta_ends_the_request_with_what_was_counted() -> None:
    backends = Backends({"t-primary": ["stall"], "t-backup": ["ok"]})
    state = _state()
    received: list[str] = []
    with pytest.raises(Unavailable) as caught:
        async for delta in _stage(backends, retry=HANG_RETRY).through_chain(state, [PRIMARY, BACKUP],
                                                                             Deadline.after(5)):
            received.append(delta)
    assert caught.value.reason == "BACKEND_TIMEOUT" and "stalled" in str(caught.value)
    assert received == ["Par"] and backends.targets() == ["t-primary"]  # no switch mid-answer
    assert backends.cancelled == ["t-primary"] and backends.faults == [("t-primary", "BACKEND_TIMEOUT")]
    assert state.counted_output_tokens == 1 and state.finish is None  # accounting bills the counted token


async def test_a_slow_but_steady_stream_is_not_a_stall() -> None:
    backends = Backends({"t-primary": ["ok"]})
    retry = RetryPolicy(first_token_timeout_s=0.2, stall_timeout_s=0.2)
    assert await _drain(_stage(backends, retry=retry), _state(), [PRIMARY]) == ["Par", "is"]
    assert backends.faults == [] and backends.cancelled == []


# --- per-route timeouts (issue 24) --------------------------------------------------------------

async def test_a_routes_own_first_token_timeout_replaces_the_global_one() -> None:
    backends = Backends({"t-primary": ["hang"], "t-backup": ["hang", "ok"]})
    retry = RetryPolicy(first_token_timeout_s=0.5, routes={"primary": RouteTimeouts(first_token_s=0.05)})
    state = _state()
    t0 = time.monotonic()
    deltas = await _drain(_stage(backends, retry=retry), state, [PRIMARY, BACKUP])
    # primary gives up after its own 0.05 s, backup (no override) after the global 0.5 s; the second round's
    # backup answers.
    assert deltas == ["Par", "is"] and backends.targets() == ["t-primary", "t-backup"] * 2
    (_, _, first), (_, _, second), (_, _, third) = backends.calls[:3]
    assert 0.04 < second - first < 0.3 and third - second >= 0.5
    assert "primary sent no first token in 0.05s" in state.route_reason
    assert "backup sent no first token in 0.5s" in state.route_reason
    assert time.monotonic() - t0 >= 0.5


async def test_a_routes_own_stall_timeout_replaces_the_global_one() -> None:
    backends = Backends({"t-primary": ["stall"]})
    retry = RetryPolicy(stall_timeout_s=5.0, routes={"primary": RouteTimeouts(stall_s=0.05)})
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match=r"stalled in 0\.05s"):
        await _drain(_stage(backends, retry=retry), _state(), [PRIMARY])
    assert time.monotonic() - t0 < 1.0 and backends.faults == [("t-primary", "BACKEND_TIMEOUT")]


async def test_a_route_without_an_override_keeps_the_global_timeouts() -> None:
    backends = Backends({"t-primary": ["hang"], "t-backup": ["ok"]})
    retry = RetryPolicy(first_token_timeout_s=0.05, routes={"backup": RouteTimeouts(first_token_s=5.0)})
    state = _state()
    assert await _drain(_stage(backends, retry=retry), state, [PRIMARY, BACKUP]) == ["Par", "is"]
    assert "primary sent no first token in 0.05s" in state.route_reason
