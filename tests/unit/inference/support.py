"""Helpers for the inference unit tests."""

from __future__ import annotations

from collections.abc import Sequence

from libs.chat import ChatMessage, GenerationChunk, GenerationParams, Role
from libs.deadlines import Deadline
from services.inference.engine import Engine

API_KEY = "sk-test-not-a-secret"


def user(text: str) -> ChatMessage:
    return ChatMessage(Role.USER, text)


def system(text: str) -> ChatMessage:
    return ChatMessage(Role.SYSTEM, text)


async def collect(engine: Engine, model: str, messages: Sequence[ChatMessage],
                  params: GenerationParams | None = None, deadline: Deadline | None = None,
                  ) -> tuple[list[str], GenerationChunk]:
    """All deltas and the final chunk; asserts the contract (deltas, then exactly one final chunk)."""
    deltas: list[str] = []
    final: GenerationChunk | None = None
    async for chunk in engine.generate("req-1", model, messages, params or GenerationParams(),
                                       deadline or Deadline.after(5)):
        assert final is None, "nothing may follow the final chunk"
        if chunk.usage is not None:
            final = chunk
        else:
            assert chunk.delta
            deltas.append(chunk.delta)
    assert final is not None
    return deltas, final
