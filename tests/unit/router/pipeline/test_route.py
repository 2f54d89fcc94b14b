"""RouteStage (services/router/pipeline/route.py): the chain of models, cheaper moves and context-window fits."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from libs.chat import ChatMessage, GenerationParams, Principal, Role
from libs.errors import InvalidArgument, PermissionDenied
from services.router.control.experiments import Experiment, Variant
from services.router.control.keys import KeyRecord
from services.router.control.pricing import Price
from services.router.control.registry import ModelEntry, Registry, RegistrySnapshot
from services.router.pipeline.admit import AdmitStage
from services.router.pipeline.complexity import RouteDecision
from services.router.pipeline.degradation import DegradationController, DegradationPolicy, Level
from services.router.pipeline.failover import CONTEXT_WINDOW_EXCEEDED
from services.router.pipeline.ports import Reservation
from services.router.pipeline.request import GenerateCommand, RequestState
from services.router.pipeline.route import RouteStage
from tests.support.router import BACKUP, KEY, PRIMARY, MemoryLimiter, command, registry_of

START = datetime(2020, 1, 1, tzinfo=UTC)
# Two cheap models, BUDGET cheaper than BACKUP; FREEBIE has no price (sorts after priced ones).
BUDGET = ModelEntry("budget", "p", "t-budget", 8192, "cheap")
FREEBIE = ModelEntry("aaa-unpriced", "p", "t-unpriced", 8192, "cheap")
PREMIUM = ModelEntry("premium", "p", "t-premium", 8192, "strong")


def _registry(models: Sequence[ModelEntry], per_mtok: dict[str, int]) -> Registry:
    registry = Registry(None, 60)
    registry.replace(RegistrySnapshot(
        models={m.name: m for m in models},
        prices={name: [Price(1, name, p, p, 0, START)] for name, p in per_mtok.items()}))
    return registry


def _priced() -> Registry:
    return _registry([PRIMARY, BACKUP, BUDGET, FREEBIE, PREMIUM],
                     {"primary": 500, "premium": 900, "backup": 200, "budget": 100})


def _key(*allowed: str) -> KeyRecord:
    return KeyRecord("k2", Principal("org2", "team2", "k2"), "member", allowed, None, False)


def _state(cmd: GenerateCommand, key: KeyRecord = KEY) -> RequestState:
    return RequestState.begin(key, cmd)


class FixedRouter:
    def __init__(self, tier: str) -> None:
        self.tier = tier
        self.seen: list[Sequence[ChatMessage]] = []

    def decide(self, messages: Sequence[ChatMessage]) -> RouteDecision:
        self.seen.append(messages)
        return RouteDecision(self.tier, 0.8, "classifier")


class OneExperiment:
    """Assigns every request for ``model`` to ``variant`` of experiment "exp"; records what it was asked."""

    def __init__(self, model: str, variant_model: str) -> None:
        self.experiment = Experiment("exp", model, (Variant("control", model, 0.5),
                                                    Variant("treat", variant_model, 0.5)), True, START)
        self.asked: list[tuple[str, str]] = []

    def for_request(self, model_name: str, user_id: str) -> tuple[Experiment, Variant] | None:
        self.asked.append((model_name, user_id))
        if model_name != self.experiment.model:
            return None
        return self.experiment, self.experiment.variants[1]


# --- resolve_chain ------------------------------------------------------------------------------

def test_requested_model_then_fallbacks_each_once() -> None:
    route = RouteStage(_priced())
    state = _state(command("primary", fallback_models=("backup", "primary", "budget", "backup")))
    chain = route.resolve_chain(KEY, state.cmd, state)
    assert [m.name for m in chain] == ["primary", "backup", "budget"]
    assert state.route_reason == ""


def test_unknown_models_are_invalid_argument_naming_each_field_path() -> None:
    route = RouteStage(_priced())
    with pytest.raises(InvalidArgument) as err:
        route.resolve_chain(KEY, command("primary", fallback_models=("backup", "nope", "nada")))
    assert [v.field for v in err.value.violations] == ["input.fallback_models[1]", "input.fallback_models[2]"]
    assert "'nope'" in err.value.violations[0].description


def test_auto_is_only_special_as_the_requested_model() -> None:
    route = RouteStage(_priced())
    with pytest.raises(InvalidArgument) as err:
        route.resolve_chain(KEY, command("primary", fallback_models=("auto",)))
    assert [v.field for v in err.value.violations] == ["input.fallback_models[0]"]


@pytest.mark.parametrize("cmd", [command("primary"), command("backup", fallback_models=("primary",))])
def test_a_model_the_key_may_not_use_is_permission_denied(cmd: GenerateCommand) -> None:
    route = RouteStage(_priced())
    with pytest.raises(PermissionDenied, match="'primary'"):
        route.resolve_chain(_key("backup"), cmd)


def test_auto_without_a_router_picks_the_cheapest_cheap_model_then_the_cheapest_other() -> None:
    route = RouteStage(_priced())
    state = _state(command("auto"))
    chain = route.resolve_chain(KEY, state.cmd, state)
    assert [m.name for m in chain] == ["budget", "primary"]  # unpriced sorts last, whatever its name
    assert state.route_reason == "auto: cheap tier (no complexity router loaded)"


def test_auto_follows_the_router_and_keeps_the_fallbacks() -> None:
    router = FixedRouter("strong")
    route = RouteStage(_priced(), auto_router=router)
    state = _state(command("auto", fallback_models=("backup",)))
    chain = route.resolve_chain(KEY, state.cmd, state)
    assert [m.name for m in chain] == ["primary", "budget", "backup"]
    assert state.route_reason == "auto: strong tier, classifier"
    assert router.seen == [state.cmd.messages]


def test_auto_only_picks_models_the_key_may_use() -> None:
    route = RouteStage(_priced(), auto_router=FixedRouter("strong"))
    chain = route.resolve_chain(_key("premium", "backup"), command("auto"))
    assert [m.name for m in chain] == ["premium", "backup"]
    with pytest.raises(InvalidArgument) as err:
        route.resolve_chain(_key("not-registered"), command("auto"))
    assert [v.field for v in err.value.violations] == ["input.model"]


def test_an_experiment_variant_goes_in_front_and_is_labelled() -> None:
    book = OneExperiment("primary", "backup")
    route = RouteStage(_priced(), experiments=book)
    state = _state(command("primary", fallback_models=("backup", "budget"), user_id="u1"))
    chain = route.resolve_chain(KEY, state.cmd, state)
    assert [m.name for m in chain] == ["backup", "primary", "budget"]
    assert state.variant == "exp/treat" and state.route_reason == "experiment exp/treat"
    assert book.asked == [("primary", "u1")]


def test_an_experiment_is_keyed_by_the_key_when_there_is_no_user_id() -> None:
    book = OneExperiment("primary", "backup")
    route = RouteStage(_priced(), experiments=book)
    state = _state(command("primary"))
    route.resolve_chain(KEY, state.cmd, state)
    assert book.asked == [("primary", KEY.key_id)]


def test_an_auto_variant_uses_the_auto_router_and_says_so() -> None:
    route = RouteStage(_priced(), auto_router=FixedRouter("strong"), experiments=OneExperiment("primary", "auto"))
    state = _state(command("primary"))
    chain = route.resolve_chain(KEY, state.cmd, state)
    assert [m.name for m in chain] == ["primary", "budget"]
    assert state.route_reason == "experiment exp/treat (auto: strong tier, classifier)"
    assert state.variant == "exp/treat"


@pytest.mark.parametrize("variant_model", ["backup", "no-longer-registered"])
def test_a_variant_the_key_may_not_use_leaves_the_request_out_of_the_experiment(variant_model: str) -> None:
    route = RouteStage(_priced(), experiments=OneExperiment("primary", variant_model))
    key = _key("primary")
    state = _state(command("primary"), key)
    chain = route.resolve_chain(key, state.cmd, state)
    assert [m.name for m in chain] == ["primary"]
    assert state.variant == "" and state.route_reason == ""


def test_without_a_state_no_experiment_is_consulted() -> None:
    book = OneExperiment("primary", "backup")
    route = RouteStage(_priced(), experiments=book)
    assert [m.name for m in route.resolve_chain(KEY, command("primary"))] == ["primary"]
    assert book.asked == []


def test_available_models_are_the_ones_the_key_may_use_by_name() -> None:
    route = RouteStage(_priced())
    assert [m.name for m in route.available_models(_key("primary", "budget", "ghost"))] == ["budget", "primary"]
    assert len(route.available_models(KEY)) == 5


# --- cheaper_chain / after_admission ------------------------------------------------------------

def test_cheaper_chain_puts_the_cheapest_cheap_model_first_once() -> None:
    route = RouteStage(_priced())
    chain = route.cheaper_chain(KEY, [PRIMARY, BUDGET, BACKUP])
    assert [m.name for m in chain] == ["budget", "primary", "backup"]


def test_cheaper_chain_leaves_a_cheap_chain_or_a_key_without_cheap_models_alone() -> None:
    route = RouteStage(_priced())
    assert route.cheaper_chain(KEY, [BACKUP, PRIMARY]) == [BACKUP, PRIMARY]
    assert route.cheaper_chain(_key("primary", "premium"), [PRIMARY, PREMIUM]) == [PRIMARY, PREMIUM]
    assert [m.name for m in route.cheaper_chain(_key("primary", "backup"), [PRIMARY])] == ["backup", "primary"]


def _reduced_admit() -> AdmitStage:
    controller = DegradationController(DegradationPolicy(min_samples=4))
    for failed in (True, False, False, False):
        controller.record(failed=failed)
    assert controller.evaluate() is Level.REDUCED
    return AdmitStage(MemoryLimiter(), default_max_output_tokens=100, side_timeout_s=0.5, degradation=controller)


def test_a_reservation_that_prefers_cheaper_moves_the_chain_and_marks_the_budget() -> None:
    route = RouteStage(_priced())
    state = _state(command("primary"))
    state.reservation = Reservation("r", prefer_cheaper=True, degraded=False)
    chain = route.after_admission(state, [PRIMARY, BACKUP], _reduced_admit())
    assert [m.name for m in chain] == ["budget", "primary", "backup"]
    assert state.degraded == ["budget"] and "95 %" in state.degraded_detail[0]


def test_prefer_cheaper_on_a_chain_already_cheap_is_not_degraded() -> None:
    route = RouteStage(_priced())
    state = _state(command("budget"))
    state.reservation = Reservation("r", prefer_cheaper=True, degraded=False)
    assert route.after_admission(state, [BUDGET, PRIMARY], _reduced_admit()) == [BUDGET, PRIMARY]
    assert state.degraded == []


def test_a_plain_reservation_at_full_level_keeps_the_chain() -> None:
    route = RouteStage(_priced())
    state = _state(command("primary"))
    state.reservation = Reservation("r", prefer_cheaper=False, degraded=False)
    assert route.after_admission(state, [PRIMARY, BACKUP], _reduced_admit()) == [PRIMARY, BACKUP]
    assert state.degraded == [] and state.degraded_detail == []


def test_reduced_level_moves_to_the_cheaper_model_with_the_controllers_reason() -> None:
    route = RouteStage(_priced())
    state = _state(command("primary"))
    state.level = Level.REDUCED
    chain = route.after_admission(state, [PRIMARY], _reduced_admit())
    assert [m.name for m in chain] == ["budget", "primary"]
    assert state.degraded == ["backend_errors"]
    assert state.degraded_detail == ["reduced mode: backend error rate 25% over the last 10 s"]


# --- context window -----------------------------------------------------------------------------

SMALL = ModelEntry("small", "p", "t-small", 64, "cheap")
MEDIUM = ModelEntry("medium", "p", "t-medium", 1000, "cheap")
LARGE = ModelEntry("large", "p", "t-large", 100_000, "cheap")
LARGE_STRONG = ModelEntry("large-strong", "p", "t-large-strong", 50_000, "strong")
UNKNOWN_WINDOW = ModelEntry("unknown-window", "p", "t-uw", 0, "cheap")


def _windows(*models: ModelEntry) -> RouteStage:
    return RouteStage(registry_of(*models))


def test_fit_context_drops_the_models_too_small_for_the_prompt() -> None:
    route = _windows(SMALL, MEDIUM, LARGE, UNKNOWN_WINDOW)
    state = _state(command("small"))
    assert route.fit_context(state, [SMALL, MEDIUM, UNKNOWN_WINDOW, LARGE], 500) == [MEDIUM, UNKNOWN_WINDOW, LARGE]
    assert route.fit_context(state, [SMALL, MEDIUM], 64) == [MEDIUM]  # a prompt must be smaller than the window
    assert state.route_reason == ""


def test_fit_context_falls_back_to_the_smallest_larger_window_on_the_same_tier() -> None:
    route = _windows(SMALL, MEDIUM, LARGE, LARGE_STRONG)
    state = _state(command("small"))
    assert route.fit_context(state, [SMALL], 2000) == [LARGE]  # cheap tier first, though strong's window is smaller
    assert state.route_reason == "context window: small (64) -> large (100000)"


def test_fit_context_only_falls_back_to_a_model_the_key_may_use() -> None:
    route = _windows(SMALL, LARGE, LARGE_STRONG)
    key = _key("small", "large-strong")
    assert route.fit_context(_state(command("small"), key), [SMALL], 2000) == [LARGE_STRONG]


def test_no_model_fits_is_invalid_argument_with_the_context_window_reason() -> None:
    route = _windows(SMALL, MEDIUM)
    state = _state(command("small"))
    with pytest.raises(InvalidArgument) as err:
        route.fit_context(state, [SMALL, MEDIUM], 5000)
    assert err.value.reason == CONTEXT_WINDOW_EXCEEDED
    assert [v.field for v in err.value.violations] == ["input.messages"]
    assert "5000" in err.value.violations[0].description


def test_after_overflow_drops_the_model_and_every_one_no_larger() -> None:
    route = _windows(SMALL, MEDIUM, LARGE)
    state = _state(command("medium"))
    assert route.after_overflow(state, [MEDIUM, SMALL, UNKNOWN_WINDOW, LARGE], MEDIUM, 10) == [UNKNOWN_WINDOW, LARGE]
    assert state.route_reason == ""


def test_after_overflow_adds_the_next_larger_registry_model_when_the_chain_has_none() -> None:
    route = _windows(SMALL, MEDIUM, LARGE)
    state = _state(command("small"))
    assert route.after_overflow(state, [SMALL], SMALL, 10) == [MEDIUM]
    assert state.route_reason == "context window: small overflowed -> medium (1000)"
    assert route.after_overflow(state, [LARGE], LARGE, 10) == []


def test_after_overflow_looks_past_the_prompt_estimate() -> None:
    # The estimate (2000) says MEDIUM is too small as well: the fallback must fit the estimate too.
    route = _windows(SMALL, MEDIUM, LARGE)
    state = _state(GenerateCommand(model="small", messages=[ChatMessage(Role.USER, "x")],
                                   params=GenerationParams(temperature=0.0)))
    assert route.after_overflow(state, [SMALL], SMALL, 2000) == [LARGE]
