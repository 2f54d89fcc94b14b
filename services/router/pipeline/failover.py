"""Which failures are retried, how long to wait between rounds, and which models a prompt fits.

The gateway walks (model, replica) candidates in order; a retryable failure moves
to the next candidate at once (another backend needs no backoff). When a whole
round has failed and the request's retry budget is not spent, it waits an
exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
And Jitter") or the backend's own retry-after, whichever is longer, and only if the
wait still leaves time before the caller's deadline.

The first-token and stall timeouts are global settings, overridable per route (model name) with
``TOLLGATE_ROUTER_ROUTE_TIMEOUTS_JSON``: :func:`parse_route_timeouts`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from libs.errors import Overloaded, QuotaExceeded, TollgateError, Unavailable
from services.router.control.registry import ModelEntry

# ErrorInfo.reason the inference service gives a prompt longer than the model's context window.
CONTEXT_WINDOW_EXCEEDED = "CONTEXT_WINDOW_EXCEEDED"

_Seconds = Annotated[float | None, Field(gt=0, allow_inf_nan=False)]


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RouteTimeouts:
    """One route's own timeouts (seconds); an unset one is the global setting."""

    first_token_s: _Seconds = None
    stall_s: _Seconds = None
    hedge_floor_s: _Seconds = None


_ROUTES = TypeAdapter(dict[Annotated[str, StringConstraints(min_length=1, max_length=128)], RouteTimeouts])


def parse_route_timeouts(text: str) -> dict[str, RouteTimeouts]:
    """``{"<model>": {"first_token_s": 20, "stall_s": 15, "hedge_floor_s": 1}}``; "" is no override.
    Raises ValueError naming the bad entry (bad JSON, an unknown field, a number that is not positive)."""
    if not text.strip():
        return {}
    try:
        return _ROUTES.validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"route timeouts: {problems}") from None


@dataclass(frozen=True)
class RetryPolicy:
    # Backend attempts per request, the first one included (fallbacks and retries share it).
    max_attempts: int = 4
    backoff_base_s: float = 0.05
    backoff_max_s: float = 2.0
    # A retry is not started unless at least this much of the deadline is left after the wait.
    min_attempt_s: float = 0.05
    # A candidate that sends no first token this long, or goes silent this long between two, is cancelled
    # and counted as a backend fault (TOLLGATE_ROUTER_INFERENCE_FIRST_TOKEN_TIMEOUT_S, ..._STALL_TIMEOUT_S).
    first_token_timeout_s: float = 10.0
    stall_timeout_s: float = 10.0
    # Per model name, overrides of the two timeouts and of the hedge floor (TOLLGATE_ROUTER_ROUTE_TIMEOUTS_JSON).
    routes: Mapping[str, RouteTimeouts] = field(default_factory=dict)

    def first_token_timeout(self, model: str) -> float:
        route = self.routes.get(model)
        return route.first_token_s if route is not None and route.first_token_s else self.first_token_timeout_s

    def stall_timeout(self, model: str) -> float:
        route = self.routes.get(model)
        return route.stall_s if route is not None and route.stall_s else self.stall_timeout_s

    def hedge_floor(self, model: str) -> float | None:
        """The route's own hedge floor (None: the hedging policy's)."""
        route = self.routes.get(model)
        return route.hedge_floor_s if route is not None else None

    def backoff(self, round_no: int, rng: random.Random | None = None) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**round)) for the ``round_no``-th retry round (1-based)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** max(0, round_no - 1)))
        return (rng or random).uniform(0, ceiling)


def is_retryable(exc: BaseException) -> bool:
    """Backend down or failing, shedding load, or a provider's rate limit: another try may succeed.
    Bad input, permissions, the caller's deadline and cancellation are final."""
    return isinstance(exc, Unavailable | Overloaded | QuotaExceeded)


def retry_after(exc: TollgateError) -> float | None:
    """The backend's own hint (Retry-After / RetryInfo), when it gave one."""
    value = getattr(exc, "retry_after_s", None)
    return float(value) if value else None


def is_context_overflow(exc: BaseException) -> bool:
    return isinstance(exc, TollgateError) and exc.reason == CONTEXT_WINDOW_EXCEEDED


def fitting(chain: Sequence[ModelEntry], prompt_tokens: int) -> list[ModelEntry]:
    """The chain without the models whose context window the prompt does not fit."""
    return [m for m in chain if m.context_window <= 0 or prompt_tokens < m.context_window]


def larger_window(models: Sequence[ModelEntry], than: int, prompt_tokens: int, prefer_tier: str,
                  exclude: Sequence[ModelEntry] = ()) -> ModelEntry | None:
    """The model to fall back to on a context-window overflow: the smallest window that fits the prompt
    and is larger than ``than``, on the preferred cost tier first, then the cheaper name."""
    options = [m for m in models if m not in exclude and m.context_window > max(than, prompt_tokens)]
    if not options:
        return None
    return min(options, key=lambda m: (m.cost_tier != prefer_tier, m.context_window, m.name))
