"""Stage 2, route: the chain of models to try, in order.

The requested model (or, for "auto", the complexity router's tier; or an A/B experiment's variant), then
the caller's fallbacks. Admission may later move the chain to a cheaper model (a budget near its end,
reduced mode); generation drops models whose context window the prompt does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from libs.chat import ChatMessage
from libs.errors import FieldViolation, InvalidArgument, PermissionDenied, Violations
from services.router.control.experiments import variant_label
from services.router.control.keys import KeyRecord
from services.router.control.registry import AUTO_MODEL, ModelEntry, Registry
from services.router.ledger.events import utcnow
from services.router.pipeline.degradation import Level
from services.router.pipeline.failover import CONTEXT_WINDOW_EXCEEDED, fitting, larger_window
from services.router.pipeline.ports import AutoRouter, ExperimentAssigner
from services.router.pipeline.request import GenerateCommand, RequestState


def too_long_for_every_model(prompt_tokens: int) -> InvalidArgument:
    """The refusal of a prompt no model this key may use can take (no retry can serve it)."""
    error = InvalidArgument([FieldViolation(
        "input.messages", f"about {prompt_tokens} prompt tokens do not fit the context window of any "
                          "model this key may use")])
    error.reason = CONTEXT_WINDOW_EXCEEDED
    return error


class ReducedMode(Protocol):
    def reduced_mode(self) -> tuple[str, str]: ...


class RouteStage:
    def __init__(self, registry: Registry, auto_router: AutoRouter | None = None,
                 experiments: ExperimentAssigner | None = None):
        self._registry = registry
        self._auto_router = auto_router
        self._experiments = experiments

    def resolve_chain(self, key: KeyRecord, cmd: GenerateCommand,
                      state: RequestState | None = None) -> list[ModelEntry]:
        """The models to try, in order: the requested one (or the auto router's / an experiment's choice),
        then the fallbacks. Records why on ``state``."""
        chain, reason = self._requested_chain(key, cmd)
        if self._experiments is not None and state is not None:
            chain, reason = self._with_experiment(key, cmd, state, chain, reason)
        if state is not None:
            state.route_reason = reason
        return chain

    def _requested_chain(self, key: KeyRecord, cmd: GenerateCommand) -> tuple[list[ModelEntry], str]:
        v = Violations()
        chain: list[ModelEntry] = []
        reason = ""
        for i, name in enumerate([cmd.model, *cmd.fallback_models]):
            path = "input.model" if i == 0 else f"input.fallback_models[{i - 1}]"
            if name == AUTO_MODEL and i == 0:
                picks, reason = self._auto_models(key, cmd.messages)
                if not picks:
                    v.add(path, "no registered model is available to this key for 'auto'")
                chain.extend(picks)
                continue
            found = self._registry.model(name)
            if found is None:
                v.add(path, f"unknown model {name!r}")
                continue
            if not key.may_use(found.name):
                raise PermissionDenied(f"this key may not use model {found.name!r}")
            if found not in chain:
                chain.append(found)
        v.raise_if_any()
        return chain, reason

    def _with_experiment(self, key: KeyRecord, cmd: GenerateCommand, state: RequestState,
                         chain: list[ModelEntry], reason: str) -> tuple[list[ModelEntry], str]:
        assert self._experiments is not None
        assigned = self._experiments.for_request(cmd.model, cmd.user_id or key.key_id)
        if assigned is None:
            return chain, reason
        experiment, variant = assigned
        label = variant_label(experiment, variant)
        if variant.model == AUTO_MODEL:
            picks, auto_reason = self._auto_models(key, cmd.messages)
        else:
            entry = self._registry.model(variant.model)
            picks, auto_reason = ([entry] if entry is not None and key.may_use(entry.name) else []), ""
        # A variant this key may not use (or one no longer registered) leaves the request out of it.
        if not picks:
            return chain, reason
        state.variant = label
        return ([*picks, *(m for m in chain if m not in picks)],
                f"experiment {label}" + (f" ({auto_reason})" if auto_reason else ""))

    def available_models(self, key: KeyRecord) -> list[ModelEntry]:
        """The registered models this key may ask for, by name."""
        return [m for m in self._registry.models() if key.may_use(m.name)]

    def cheaper_chain(self, key: KeyRecord, chain: list[ModelEntry]) -> list[ModelEntry]:
        """The chain with the cheapest cheap-tier model this key may use in front (unchanged if the
        chain already starts on the cheap tier or the key may use none)."""
        if chain[0].cost_tier == "cheap":
            return chain
        cheap = self._by_price([m for m in self._registry.models() if m.cost_tier == "cheap" and key.may_use(m.name)])
        if not cheap:
            return chain
        return [cheap[0], *(m for m in chain if m != cheap[0])]

    def _by_price(self, models: list[ModelEntry]) -> list[ModelEntry]:
        """Cheapest first (input + output price now; unpriced models last), then by name."""
        now = utcnow()

        def rank(m: ModelEntry) -> tuple[int, int, str]:
            price = self._registry.price(m.name, now)
            return (price is None, price.input_per_mtok + price.output_per_mtok if price else 0, m.name)

        return sorted(models, key=rank)

    def _auto_models(self, key: KeyRecord, messages: Sequence[ChatMessage]) -> tuple[list[ModelEntry], str]:
        """For "auto": the cheapest model of the tier the complexity router picks, then the cheapest of the
        other tier as its fallback."""
        usable = self.available_models(key)
        if self._auto_router is None:
            tier, reason = "cheap", "auto: cheap tier (no complexity router loaded)"
        else:
            decision = self._auto_router.decide(messages)
            tier, reason = decision.tier, f"auto: {decision.tier} tier, {decision.reason}"
        first = self._by_price([m for m in usable if m.cost_tier == tier])
        other = self._by_price([m for m in usable if m.cost_tier != tier])
        return [*first[:1], *other[:1]], reason

    def after_admission(self, state: RequestState, chain: list[ModelEntry], admit: ReducedMode) -> list[ModelEntry]:
        """The chain moved to the cheapest cheap-tier model when admission asks for it: a budget at 95 %
        (DESIGN step 3; the reservation held the dearer estimate and the commit settles the real cost), or
        the gateway in reduced mode."""
        if state.reservation is not None and state.reservation.prefer_cheaper:
            cheaper = self.cheaper_chain(state.key, chain)
            if cheaper[0] != chain[0]:
                chain = cheaper
                state.degrade("budget", "budget at 95 %: moved to the cheaper model")
        if state.level == Level.REDUCED:
            chain = self.cheaper_chain(state.key, chain)
            state.degrade(*admit.reduced_mode())
        return chain

    # --- the context window (asked again by the generate stage) ---------------------------

    def fit_context(self, state: RequestState, chain: list[ModelEntry], prompt_tokens: int) -> list[ModelEntry]:
        """Leave out the models whose context window the prompt does not fit; if none is left, fall back to
        the registry's model with the smallest window that fits."""
        fits = fitting(chain, prompt_tokens)
        if fits:
            return fits
        bigger = larger_window(self.available_models(state.key), max(m.context_window for m in chain),
                               prompt_tokens, chain[0].cost_tier)
        if bigger is None:
            raise too_long_for_every_model(prompt_tokens)
        state.add_route_reason(f"context window: {chain[0].name} ({chain[0].context_window}) -> {bigger.name} "
                               f"({bigger.context_window})")
        return [bigger]

    def after_overflow(self, state: RequestState, chain: list[ModelEntry], model: ModelEntry,
                       prompt_tokens: int) -> list[ModelEntry]:
        """The backend said the prompt does not fit ``model``: drop it and every model with no larger window,
        adding the registry's next larger window when the chain has none."""
        rest = [m for m in chain if m != model and (m.context_window <= 0 or m.context_window > model.context_window)]
        if rest:
            return rest
        bigger = larger_window(self.available_models(state.key), model.context_window, prompt_tokens,
                               model.cost_tier, exclude=chain)
        if bigger is None:
            return []
        state.add_route_reason(f"context window: {model.name} overflowed -> {bigger.name} ({bigger.context_window})")
        return [bigger]
