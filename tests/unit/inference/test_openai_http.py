"""OpenAIHttpEngine against the fake provider over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from libs.chat import FinishReason, GenerationParams
from libs.deadlines import Deadline
from libs.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, QuotaExceeded, Unavailable
from libs.tokens import estimate_tokens
from services.inference.engine import USAGE_ESTIMATED, ServedModel
from services.inference.http_engine import PROVIDER_RATE_LIMITED, parse_retry_after
from services.inference.openai_http import OpenAIHttpEngine
from tests.support.infra import free_port
from tests.unit.inference.support import collect, system, user
from tools.fake_provider import ANSWER_PREFIX, FILLER_WORD, FakeProvider, count_words


async def test_streams_deltas_then_usage(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(chunk_delay_ms=20)  # one event per network read (events that arrive together become one delta)
    messages = [system("You are terse."), user("what is a gateway for")]
    deltas, final = await collect(openai_engine, "tiny", messages)
    text = "".join(deltas)
    assert text == f"{ANSWER_PREFIX} what is a gateway for"
    assert count_words(ANSWER_PREFIX) == 7
    assert len(deltas) == count_words(text)  # really streamed, one word per delta
    assert final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cached_input_tokens) == (8, 7 + 5, 0)
    assert final.finish_reason is FinishReason.STOP
    assert (final.model, final.provider) == ("fake-small", "fakeai")
    assert USAGE_ESTIMATED not in final.extra

    sent = fake.snapshot()["last_request"]
    assert sent["model"] == "fake-small"  # the public name maps to the upstream one
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert fake.snapshot()["last_headers"]["x-request-id"] == "req-1"

    # Same system prompt again: the provider's prefix cache reports cached prompt tokens.
    _, again = await collect(openai_engine, "tiny", messages)
    assert again.usage is not None and again.usage.cached_input_tokens == 3


async def test_params_are_forwarded_and_length_finish(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    params = GenerationParams(temperature=0.0, top_p=0.5, max_output_tokens=4, stop=("zzz",), seed=7)
    deltas, final = await collect(openai_engine, "tiny", [user("hello")], params)
    assert "".join(deltas) == "This is a fake"
    assert final.finish_reason is FinishReason.LENGTH
    assert final.usage is not None and final.usage.output_tokens == 4
    sent = fake.snapshot()["last_request"]
    assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["stop"], sent["seed"]) == (
        0.0, 0.5, 4, ["zzz"], 7)


async def test_odd_byte_splits_and_multibyte_utf8(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="split_chunks")
    deltas, final = await collect(openai_engine, "tiny", [user("héllo wörld 日本語 🎉 ok")])
    assert "".join(deltas) == f"{ANSWER_PREFIX} héllo wörld 日本語 🎉 ok"
    assert final.usage is not None and final.usage.output_tokens == 7 + 5


async def test_connections_are_reused(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    for _ in range(3):
        await collect(openai_engine, "tiny", [user("hi")])
    assert fake.snapshot()["connections_seen"] == 1


async def test_missing_usage_is_estimated_and_marked(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(omit_usage=True)
    deltas, final = await collect(openai_engine, "tiny", [user("hi there")])
    assert final.extra[USAGE_ESTIMATED] == "true"
    assert final.usage is not None
    assert final.usage.output_tokens == estimate_tokens("".join(deltas))
    assert final.usage.input_tokens > 0


async def test_rate_limit_is_quota_with_retry_after(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="rate_limit_429", retry_after_s=7)
    with pytest.raises(QuotaExceeded) as exc_info:
        await collect(openai_engine, "tiny", [user("hi")])
    assert exc_info.value.reason == PROVIDER_RATE_LIMITED  # not a breaker fault
    assert exc_info.value.retry_after_s == 7
    assert exc_info.value.violations[0].subject == "provider:fakeai"


async def test_server_error_is_backend_error(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="error_500", retry_after_on_500=True, retry_after_s=2)
    with pytest.raises(Unavailable) as exc_info:
        await collect(openai_engine, "tiny", [user("hi")])
    assert exc_info.value.reason == "BACKEND_ERROR"
    assert exc_info.value.retry_after_s == 2


async def test_fail_next_n_then_recovers(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="error_500", fail_next_n=1)
    with pytest.raises(Unavailable):
        await collect(openai_engine, "tiny", [user("hi")])
    _, final = await collect(openai_engine, "tiny", [user("hi")])
    assert final.finish_reason is FinishReason.STOP


async def test_hang_is_bounded_by_the_callers_deadline(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="hang")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await collect(openai_engine, "tiny", [user("hi")], deadline=Deadline.after(0.3))
    assert 0.2 < time.monotonic() - started < 0.6
    state = await fake.wait_idle()
    assert (state["active_streams"], state["cancelled_streams"]) == (0, 1)

    fake.configure(mode="normal")  # the engine (and its pool) is fine afterwards
    _, final = await collect(openai_engine, "tiny", [user("hi")])
    assert final.finish_reason is FinishReason.STOP


async def test_hang_against_the_services_own_cap_is_backend_timeout(openai_engine: OpenAIHttpEngine,
                                                                    fake: FakeProvider) -> None:
    fake.configure(mode="hang")
    cap = Deadline.from_remaining(None, default_s=0.3, max_s=10)
    assert not cap.from_caller
    with pytest.raises(Unavailable) as exc_info:
        await collect(openai_engine, "tiny", [user("hi")], deadline=cap)
    assert exc_info.value.reason == "BACKEND_TIMEOUT"
    assert (await fake.wait_idle())["active_streams"] == 0


async def test_hang_mid_stream_is_bounded(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="hang_mid_stream")
    seen: list[str] = []
    with pytest.raises(DeadlineExceeded):
        async for chunk in openai_engine.generate("r", "tiny", [user("hi")], GenerationParams(), Deadline.after(0.3)):
            seen.append(chunk.delta)
    assert seen  # the first delta made it before the silence
    assert (await fake.wait_idle())["active_streams"] == 0


async def test_idle_limit_cuts_a_silent_stream_even_with_time_left(fake: FakeProvider) -> None:
    engine = OpenAIHttpEngine(base_url=fake.url, api_key="sk-test-not-a-secret", stream_idle_timeout_s=0.2,
                              models=[ServedModel("tiny", "fakeai", 1000)])
    fake.configure(mode="hang_mid_stream")
    try:
        with pytest.raises(Unavailable) as exc_info:
            await collect(engine, "tiny", [user("hi")], deadline=Deadline.after(10))
        assert exc_info.value.reason == "BACKEND_TIMEOUT"
    finally:
        await engine.aclose()


async def test_malformed_chunk(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(mode="malformed_chunk")
    with pytest.raises(Unavailable) as exc_info:
        await collect(openai_engine, "tiny", [user("hi")])
    assert exc_info.value.reason == "BACKEND_ERROR"
    assert "malformed" in exc_info.value.message


async def test_connection_refused_is_unavailable() -> None:
    engine = OpenAIHttpEngine(base_url=f"http://127.0.0.1:{free_port()}", api_key="",
                              models=[ServedModel("tiny", "fakeai", 1000)])
    try:
        with pytest.raises(Unavailable) as exc_info:
            await collect(engine, "tiny", [user("hi")])
        assert exc_info.value.reason == "UNAVAILABLE"
    finally:
        await engine.aclose()


async def test_bad_credentials_are_a_failed_precondition(fake: FakeProvider) -> None:
    engine = OpenAIHttpEngine(base_url=fake.url, api_key="sk-wrong", models=[ServedModel("tiny", "fakeai", 1000)])
    try:
        with pytest.raises(FailedPrecondition) as exc_info:
            await collect(engine, "tiny", [user("hi")])
        assert "sk-wrong" not in str(exc_info.value)
    finally:
        await engine.aclose()


async def test_provider_400_is_invalid_argument() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "max_tokens is too large", "param": "max_tokens"}})

    engine = OpenAIHttpEngine(base_url="http://provider.test", api_key="", transport=httpx.MockTransport(handler),
                              models=[ServedModel("tiny", "fakeai", 1000)])
    try:
        with pytest.raises(InvalidArgument) as exc_info:
            await collect(engine, "tiny", [user("hi")])
        assert exc_info.value.violations[0].field == "params.max_output_tokens"
    finally:
        await engine.aclose()


async def test_closing_the_stream_disconnects_the_provider(openai_engine: OpenAIHttpEngine,
                                                           fake: FakeProvider) -> None:
    fake.configure(extra_words=200, chunk_delay_ms=10)
    stream = openai_engine.generate("r", "tiny", [user("hi")], GenerationParams(), Deadline.after(10))
    got = [await anext(stream), await anext(stream)]
    assert all(c.delta for c in got)
    assert fake.snapshot()["active_streams"] == 1
    await stream.aclose()  # type: ignore[attr-defined]
    state = await fake.wait_idle()
    assert (state["active_streams"], state["cancelled_streams"], state["completed_streams"]) == (0, 1, 0)
    assert openai_engine.load().running == 0


async def test_cancelling_the_consumer_task_disconnects_the_provider(openai_engine: OpenAIHttpEngine,
                                                                     fake: FakeProvider) -> None:
    fake.configure(extra_words=200, chunk_delay_ms=10)
    first = asyncio.Event()

    async def consume() -> None:
        async for chunk in openai_engine.generate("r", "tiny", [user("hi")], GenerationParams(), Deadline.after(10)):
            if chunk.delta:
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = await fake.wait_idle()
    assert (state["active_streams"], state["cancelled_streams"]) == (0, 1)


async def test_long_stream_completes(openai_engine: OpenAIHttpEngine, fake: FakeProvider) -> None:
    fake.configure(extra_words=300)
    deltas, final = await collect(openai_engine, "tiny", [user("hi")])
    assert "".join(deltas).endswith(f" {FILLER_WORD}")
    assert final.usage is not None and final.usage.output_tokens == count_words(ANSWER_PREFIX) + 1 + 300
    assert fake.snapshot()["completed_streams"] == 1


async def test_count_tokens_and_models(openai_engine: OpenAIHttpEngine) -> None:
    assert await openai_engine.count_tokens("tiny", [user("a" * 40)]) == 10 + 4
    assert [m.name for m in openai_engine.models()] == ["tiny"]


def test_parse_retry_after() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250", "retry-after": "3"})) == 0.25
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    value = parse_retry_after(httpx.Headers({"retry-after": when}))
    assert value is not None and 25 < value <= 31


async def test_deltas_that_arrive_together_go_out_as_one_chunk(openai_engine: OpenAIHttpEngine,
                                                               fake: FakeProvider) -> None:
    # An upstream that sends many events in one write (nginx serving a file, a batching provider): one chunk
    # per read, the same text and usage. One gRPC message per read instead of one per token.
    fake.configure(mode="burst", extra_words=200)
    deltas, final = await collect(openai_engine, "tiny", [user("burst")])
    text = "".join(deltas)
    assert text.startswith(ANSWER_PREFIX) and text.count(FILLER_WORD) == 200
    assert len(deltas) < count_words(text) / 4
    assert final.usage is not None and final.usage.output_tokens == count_words(text)
