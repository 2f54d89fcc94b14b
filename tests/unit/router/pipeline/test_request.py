"""RequestState, GenerateCommand and price_in_force (services/router/pipeline/request.py), stage by stage."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from libs.chat import ChatMessage, FinishReason, GenerationParams, Role, TokenUsage
from libs.errors import (
    InvalidArgument,
    Overloaded,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unavailable,
)
from services.router.control.pricing import FREE, Price
from services.router.control.registry import ModelEntry, Registry, RegistrySnapshot
from services.router.pipeline.request import CachePolicy, GenerateCommand, RequestState, price_in_force
from tests.support.router import KEY, PRIMARY, command, registry_of

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _price(version: int, model: str, effective_from: datetime, per_mtok: int) -> Price:
    return Price(version, model, per_mtok, 2 * per_mtok, 0, effective_from)


def _versioned_registry() -> Registry:
    """``primary``: v1 from 2020, v2 from T0 + 1 day; ``unpriced``: no price at all."""
    registry = Registry(None, 60)
    unpriced = ModelEntry("unpriced", "p", "t-unpriced", 8192, "cheap")
    registry.replace(RegistrySnapshot(
        models={"primary": PRIMARY, "unpriced": unpriced},
        prices={"primary": [_price(1, "primary", datetime(2020, 1, 1, tzinfo=UTC), 1_000_000_000),
                            _price(2, "primary", T0 + timedelta(days=1), 5_000_000_000)]}))
    return registry


def _state(cmd: GenerateCommand | None = None) -> RequestState:
    return RequestState.begin(KEY, cmd or command())


# --- begin / use_model / price_in_force ---------------------------------------------------------

def test_begin_takes_the_given_request_id_or_makes_a_fresh_one() -> None:
    assert RequestState.begin(KEY, command(), "req-1").request_id == "req-1"
    a, b = _state(), _state()
    assert a.request_id != b.request_id and len(a.request_id) == 32
    assert a.started_at.tzinfo is not None and a.status == "ok" and a.cache_tier == "miss"
    assert a.model is None and a.price is FREE


def test_use_model_prices_at_the_version_in_force_when_the_request_started() -> None:
    registry = _versioned_registry()
    state = _state()
    state.started_at = T0  # v2 takes effect a day after the request started
    state.use_model(PRIMARY, registry)
    assert state.model is PRIMARY and state.price.version == 1
    later = _state()
    later.started_at = T0 + timedelta(days=2)
    later.use_model(PRIMARY, registry)
    assert later.price.version == 2


def test_a_model_without_a_price_is_free() -> None:
    registry = _versioned_registry()
    unpriced = registry.model("unpriced")
    assert unpriced is not None
    assert price_in_force(registry, unpriced, T0) is FREE
    state = _state()
    state.price = _price(9, "x", T0, 1)  # whatever it held before
    state.use_model(unpriced, registry)
    assert state.price is FREE and state.price.cost(TokenUsage(1000, 1000)) == 0


def test_price_in_force_before_the_first_version_is_free() -> None:
    assert price_in_force(_versioned_registry(), PRIMARY, datetime(2019, 1, 1, tzinfo=UTC)) is FREE
    assert price_in_force(registry_of(PRIMARY), PRIMARY, T0).version == 1


# --- degrade / route reason ---------------------------------------------------------------------

def test_degrade_keeps_each_reason_and_each_detail_once_in_order() -> None:
    state = _state()
    state.degrade("budget", "budget at 95 %")
    state.degrade("load", "busy")
    state.degrade("budget", "budget at 95 %")
    state.degrade("budget", "a second detail")
    state.degrade("stale_cache", "")
    assert state.degraded == ["budget", "load", "stale_cache"]
    assert state.degraded_detail == ["budget at 95 %", "busy", "a second detail"]


def test_add_route_reason_joins_with_semicolons() -> None:
    state = _state()
    state.add_route_reason("auto: cheap tier")
    assert state.route_reason == "auto: cheap tier"
    state.add_route_reason("context window: a -> b")
    assert state.route_reason == "auto: cheap tier; context window: a -> b"


# --- end_with -----------------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [asyncio.CancelledError(), GeneratorExit()])
def test_cancellation_ends_the_request_cancelled(exc: BaseException) -> None:
    state = _state()
    state.end_with(exc)
    assert (state.status, state.finish, state.error_reason) == ("cancelled", FinishReason.CANCELLED, "")


@pytest.mark.parametrize(("exc", "reason"), [
    (QuotaExceeded("over", [QuotaViolation("key:k", "tpm")], 3.0), "QUOTA_EXCEEDED"),
    (Overloaded("shedding", 1.0), "OVERLOADED"),
])
def test_refusals_end_the_request_rejected_with_their_reason(exc: TollgateError, reason: str) -> None:
    state = _state()
    state.end_with(exc)
    assert (state.status, state.error_reason, state.finish) == ("rejected", reason, None)


def test_a_budget_refusal_keeps_its_own_reason() -> None:
    exc = QuotaExceeded("budget", [QuotaViolation("org:o", "daily")], 60.0)
    exc.reason = "BUDGET_EXHAUSTED"
    state = _state()
    state.end_with(exc)
    assert (state.status, state.error_reason) == ("rejected", "BUDGET_EXHAUSTED")


@pytest.mark.parametrize(("exc", "reason"), [
    (Unavailable("no backend", reason="NO_BACKEND"), "NO_BACKEND"),
    (InvalidArgument([], "bad"), "INVALID_ARGUMENT"),
])
def test_other_domain_errors_end_the_request_in_error_with_their_reason(exc: TollgateError, reason: str) -> None:
    state = _state()
    state.end_with(exc)
    assert (state.status, state.error_reason) == ("error", reason)


def test_an_unexpected_exception_is_an_internal_error() -> None:
    state = _state()
    state.end_with(ValueError("bug"))
    assert (state.status, state.error_reason) == ("error", "INTERNAL_ERROR")


def test_keyboard_interrupt_leaves_the_status_as_it_was() -> None:
    state = _state()
    state.end_with(KeyboardInterrupt())
    assert (state.status, state.error_reason, state.finish) == ("ok", "", None)


# --- billed_usage -------------------------------------------------------------------------------

def _prompt_state() -> RequestState:
    # "12345678" is (8 + 3) // 4 = 2 tokens plus 4 of per-message overhead: 6 prompt tokens.
    return _state(GenerateCommand(model="primary", messages=[ChatMessage(Role.USER, "12345678")],
                                  params=GenerationParams(temperature=0.0)))


def test_the_engines_usage_wins_over_any_estimate() -> None:
    state = _prompt_state()
    state.text = ["a long answer " * 20]
    state.counted_output_tokens = 99
    state.usage = TokenUsage(7, 3, 2)
    assert state.billed_usage() == TokenUsage(7, 3, 2)


def test_nothing_generated_bills_nothing() -> None:
    state = _prompt_state()
    state.counted_output_tokens = 5  # counted, but no text ever reached the caller
    assert state.billed_usage() == TokenUsage(0, 0, 0)


def test_cut_off_bills_the_prompt_estimate_and_the_engines_counted_tokens() -> None:
    state = _prompt_state()
    state.text = ["hello ", "world"]
    state.counted_output_tokens = 11
    assert state.prompt_tokens() == 6
    assert state.billed_usage() == TokenUsage(6, 11, 0)


def test_cut_off_without_counted_tokens_estimates_the_output_delta_by_delta() -> None:
    state = _prompt_state()
    state.text = ["hello ", "world"]  # (6 + 3) // 4 + (5 + 3) // 4 = 2 + 2
    assert state.billed_usage() == TokenUsage(6, 4, 0)


# --- GenerateCommand.cacheable ------------------------------------------------------------------

@pytest.mark.parametrize(("temperature", "allow", "cacheable"), [
    (0.0, False, True),
    (0.7, False, False),
    (None, False, False),  # the engine's default temperature is not greedy
    (0.7, True, True),
    (None, True, True),
])
def test_cacheable_is_greedy_decoding_or_an_explicit_opt_in(temperature: float | None, allow: bool,
                                                           cacheable: bool) -> None:
    cmd = command(temperature=temperature, cache=CachePolicy(allow_nondeterministic=allow))
    assert cmd.cacheable is cacheable
