"""Which failures are retried, how long to wait between rounds, and which models a prompt fits.

The gateway walks (model, replica) candidates in order; a retryable failure moves
to the next candidate at once (another backend needs no backoff). When a whole
round has failed and the request's retry budget is not spent, it waits an
exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
And Jitter") or the backend's own retry-after, whichever is longer, and only if the
wait still leaves time before the caller's deadline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from libs.errors import Overloaded, QuotaExceeded, TollgateError, Unavailable
from services.router.control.registry import ModelEntry

# ErrorInfo.reason the inference service gives a prompt longer than the model's context window.
CONTEXT_WINDOW_EXCEEDED = "CONTEXT_WINDOW_EXCEEDED"


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
