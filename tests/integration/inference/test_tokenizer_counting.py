"""A provider stream without usage is counted with the model's tokenizer (exact), else estimated and marked."""

from __future__ import annotations

import pytest

from libs.chat import ChatMessage, GenerationParams, Role
from libs.deadlines import Deadline
from services.inference.engine import USAGE_ESTIMATED, ServedModel
from services.inference.model_setup import DEFAULT_DIR, is_prepared
from services.inference.openai_http import OpenAIHttpEngine
from services.inference.tokenizer import EstimatingCounter, HfTokenizerCounter, TokenCounter
from tools.fake_provider import FakeProvider

MESSAGES = [ChatMessage(Role.SYSTEM, "You are terse."), ChatMessage(Role.USER, "Name three rivers in Europe.")]


async def _final(provider: FakeProvider, counter: TokenCounter) -> tuple[str, object]:
    engine = OpenAIHttpEngine(base_url=provider.url, api_key="", counter=counter,
                              models=[ServedModel("m", "openai", 4096, "fake-small")])
    try:
        text, final = [], None
        async for chunk in engine.generate("r", "m", MESSAGES, GenerationParams(max_output_tokens=32),
                                           Deadline.after(10)):
            text.append(chunk.delta)
            final = chunk if chunk.usage is not None else final
        return "".join(text), final
    finally:
        await engine.aclose()


@pytest.mark.skipif(not is_prepared(DEFAULT_DIR), reason="the bundled model's tokenizer is prepared by make setup")
async def test_missing_usage_is_counted_with_the_models_tokenizer() -> None:
    counter = HfTokenizerCounter(DEFAULT_DIR)
    async with FakeProvider() as provider:
        provider.configure(omit_usage=True)
        text, final = await _final(provider, counter)
    assert final.usage.input_tokens == counter.prompt_tokens(MESSAGES)  # type: ignore[attr-defined]
    assert final.usage.output_tokens == counter.text_tokens(text) > 0  # type: ignore[attr-defined]
    assert USAGE_ESTIMATED not in final.extra  # type: ignore[attr-defined]


async def test_without_a_tokenizer_the_count_is_an_estimate_and_says_so() -> None:
    async with FakeProvider() as provider:
        provider.configure(omit_usage=True)
        _, final = await _final(provider, EstimatingCounter())
    assert final.extra[USAGE_ESTIMATED] == "true"  # type: ignore[attr-defined]
    assert final.usage.output_tokens > 0  # type: ignore[attr-defined]


async def test_a_reported_usage_wins_over_any_count() -> None:
    async with FakeProvider() as provider:
        text, final = await _final(provider, EstimatingCounter())
    # The fake provider reports word counts; our estimate (chars / 4) would differ.
    assert final.usage.output_tokens == len(text.split())  # type: ignore[attr-defined]
    assert USAGE_ESTIMATED not in final.extra  # type: ignore[attr-defined]
