"""AnthropicHttpEngine against the fake provider over real HTTP on loopback."""

from __future__ import annotations

import httpx
import pytest

from libs.chat import ChatMessage, FinishReason, GenerationParams, Role
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, QuotaExceeded, Unavailable
from services.inference.anthropic_http import AnthropicHttpEngine, messages_body
from services.inference.engine import ServedModel
from services.inference.http_engine import PROVIDER_RATE_LIMITED
from tests.unit.inference.support import API_KEY, collect, system, user
from tools.fake_provider import ANSWER_PREFIX, FakeProvider


async def test_happy_path_with_usage(anthropic_engine: AnthropicHttpEngine, fake: FakeProvider) -> None:
    fake.configure(chunk_delay_ms=20)  # one event per network read (events that arrive together become one delta)
    messages = [system("Be brief and kind."), user("tell me about caches")]
    deltas, final = await collect(anthropic_engine, "claude-tiny", messages)
    assert "".join(deltas) == f"{ANSWER_PREFIX} tell me about caches"
    assert len(deltas) == 7 + 4
    assert final.usage is not None
    # 4 system words + 4 user words in; 11 words out; nothing cached yet.
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cached_input_tokens) == (8, 11, 0)
    assert final.finish_reason is FinishReason.STOP
    assert (final.model, final.provider) == ("fake-claude", "anthropic")

    sent = fake.snapshot()["last_request"]
    assert sent["system"] == "Be brief and kind."  # system messages go to the top-level field
    assert sent["messages"] == [{"role": "user", "content": "tell me about caches"}]
    assert sent["max_tokens"] == 50 and sent["stream"] is True
    assert fake.snapshot()["last_headers"]["anthropic-version"] == "2023-06-01"

    # Cache reads count as input tokens and as cached input tokens.
    _, again = await collect(anthropic_engine, "claude-tiny", messages)
    assert again.usage is not None
    assert (again.usage.input_tokens, again.usage.cached_input_tokens) == (8, 4)


async def test_max_tokens_finish_is_length(anthropic_engine: AnthropicHttpEngine) -> None:
    deltas, final = await collect(anthropic_engine, "claude-tiny", [user("hi")],
                                  GenerationParams(max_output_tokens=3))
    assert "".join(deltas) == "This is a"
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage is not None and final.usage.output_tokens == 3


async def test_odd_byte_splits(anthropic_engine: AnthropicHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="split_chunks")
    deltas, _ = await collect(anthropic_engine, "claude-tiny", [user("çà et là — 東京 🚀")])
    assert "".join(deltas) == f"{ANSWER_PREFIX} çà et là — 東京 🚀"


async def test_rate_limit(anthropic_engine: AnthropicHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="rate_limit_429", retry_after_s=3)
    with pytest.raises(QuotaExceeded) as exc_info:
        await collect(anthropic_engine, "claude-tiny", [user("hi")])
    assert exc_info.value.reason == PROVIDER_RATE_LIMITED
    assert exc_info.value.retry_after_s == 3


async def test_malformed_event(anthropic_engine: AnthropicHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="malformed_chunk")
    with pytest.raises(Unavailable, match="malformed") as exc_info:
        await collect(anthropic_engine, "claude-tiny", [user("hi")])
    assert exc_info.value.reason == "BACKEND_ERROR"


async def test_hang_mid_stream_is_bounded(anthropic_engine: AnthropicHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="hang_mid_stream")
    with pytest.raises(DeadlineExceeded):
        await collect(anthropic_engine, "claude-tiny", [user("hi")], deadline=Deadline.after(0.3))
    assert (await fake.wait_idle())["active_streams"] == 0


async def test_error_event_mid_stream_is_backend_error() -> None:
    body = (b'event: message_start\ndata: {"type": "message_start", "message": {"model": "m", "usage": '
            b'{"input_tokens": 3, "output_tokens": 1}}}\n\n'
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
            b'"message": "Overloaded"}}\n\n')

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    engine = AnthropicHttpEngine(base_url="http://provider.test", api_key=API_KEY,
                                 transport=httpx.MockTransport(handler), models=[ServedModel("c", "anthropic", 100)])
    try:
        with pytest.raises(Unavailable, match="Overloaded") as exc_info:
            await collect(engine, "c", [user("hi")])
        assert exc_info.value.reason == "BACKEND_ERROR"
    finally:
        await engine.aclose()


def test_body_merges_turns_and_lifts_system() -> None:
    body = messages_body("m", [
        ChatMessage(Role.SYSTEM, "s1"), ChatMessage(Role.USER, "u1"), ChatMessage(Role.SYSTEM, "s2"),
        ChatMessage(Role.USER, "u2"), ChatMessage(Role.ASSISTANT, "a1"), ChatMessage(Role.TOOL, "t1"),
    ], GenerationParams(temperature=0.5, stop=("END",)), default_max_tokens=99)
    assert body["system"] == "s1\n\ns2"
    assert body["messages"] == [{"role": "user", "content": "u1\n\nu2"}, {"role": "assistant", "content": "a1"},
                                {"role": "user", "content": "t1"}]
    assert (body["max_tokens"], body["temperature"], body["stop_sequences"]) == (99, 0.5, ["END"])
    assert "top_p" not in body
