"""The engine contract: what runs a generation, behind one Protocol.

An engine streams :class:`~libs.chat.GenerationChunk` s for one request: text
deltas, then exactly one final chunk carrying ``usage``, ``finish_reason``,
``model`` and ``provider``. Closing the iterator (``aclose()``, or cancelling
the task that iterates it) must stop the work: an HTTP engine closes the
response so the provider sees the disconnect; an in-process engine (vLLM's
``AsyncLLM``) aborts the request. Failures are :mod:`libs.errors` types.

Implementations: :class:`~services.inference.openai_http.OpenAIHttpEngine`,
:class:`~services.inference.anthropic_http.AnthropicHttpEngine`; a ``VllmEngine``
fits the same shape (``generate`` over ``AsyncLLM.generate`` with DELTA output,
``abort`` in ``finally``, the tokenizer's chat template for ``count_tokens``,
scheduler stats for ``load``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from libs.chat import ChatMessage, GenerationChunk, GenerationParams
from libs.deadlines import Deadline
from libs.errors import FieldViolation, InvalidArgument

# GenerationChunk.extra key set on the final chunk when usage was estimated, not reported.
USAGE_ESTIMATED = "usage_estimated"


@dataclass(frozen=True)
class ServedModel:
    """A model this engine answers for: the public name, and what the provider calls it."""

    name: str
    provider: str
    context_window: int
    upstream: str = ""

    @property
    def upstream_name(self) -> str:
        return self.upstream or self.name


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its work (an HTTP engine has no queue and no KV cache)."""

    running: int
    waiting: int = 0
    # Fraction of KV-cache blocks in use, 0..1.
    kv_cache_usage: float = 0.0


@runtime_checkable
class Engine(Protocol):
    """Runs generations for the models it serves."""

    def generate(self, request_id: str, model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                 deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        """Stream deltas then one final chunk; ``model`` is a public name from :meth:`models`."""
        ...

    async def count_tokens(self, model: str, messages: Sequence[ChatMessage]) -> int:
        """Input tokens ``messages`` take for ``model``, chat template included."""
        ...

    def models(self) -> list[ServedModel]:
        ...

    def load(self) -> EngineLoad:
        ...

    async def aclose(self) -> None:
        """Release connections (or the model); no generate call is made after this."""
        ...


# ErrorInfo.reason of a prompt that does not fit the model (the router's failover reads it).
CONTEXT_WINDOW_EXCEEDED = "CONTEXT_WINDOW_EXCEEDED"


def context_window_exceeded(input_tokens: int, context_window: int) -> InvalidArgument:
    """INVALID_ARGUMENT with reason CONTEXT_WINDOW_EXCEEDED: the router falls back to a model with a larger window."""
    error = InvalidArgument([FieldViolation("messages", f"about {input_tokens} input tokens exceed the "
                                                        f"context window of {context_window}")])
    error.reason = CONTEXT_WINDOW_EXCEEDED
    return error
