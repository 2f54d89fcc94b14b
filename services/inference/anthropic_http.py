"""Anthropic's messages API over HTTP, streamed.

System messages go to the top-level ``system`` field; consecutive messages of
one role are merged (the API wants alternating turns). Usage comes from
``message_start`` (input, cache reads and writes) and ``message_delta``
(cumulative output). ``TokenUsage.input_tokens`` is the whole prompt, cache
reads included, as for OpenAI; ``cached_input_tokens`` is the cache-read part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx

from libs.chat import ChatMessage, FinishReason, GenerationChunk, GenerationParams, Role, TokenUsage
from libs.deadlines import Deadline
from services.inference.engine import ServedModel
from services.inference.http_engine import HttpEngineBase, as_int, malformed, parse_json, stream_error
from services.inference.sse import SSEEvent
from services.inference.tokenizer import TokenCounter

MESSAGES_PATH = "/v1/messages"

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "tool_use": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "refusal": FinishReason.CONTENT_FILTER,
}


def messages_body(upstream_model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                  default_max_tokens: int) -> dict[str, Any]:
    system = [m.content for m in messages if m.role is Role.SYSTEM]
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role is Role.SYSTEM:
            continue
        role = "assistant" if m.role is Role.ASSISTANT else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + m.content
        else:
            turns.append({"role": role, "content": m.content})
    body: dict[str, Any] = {
        "model": upstream_model,
        "max_tokens": params.max_output_tokens or default_max_tokens,
        "messages": turns,
        "stream": True,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    return body


class AnthropicHttpEngine(HttpEngineBase):
    def __init__(self, *, base_url: str, api_key: str, models: Sequence[ServedModel], provider: str = "anthropic",
                 anthropic_version: str = "2023-06-01", default_max_output_tokens: int = 1024,
                 connect_timeout_s: float = 5.0, stream_idle_timeout_s: float = 60.0,
                 deadline_margin_s: float = 0.02, max_connections: int = 100,
                 transport: httpx.AsyncBaseTransport | None = None, counter: TokenCounter | None = None):
        headers = {"accept": "text/event-stream", "anthropic-version": anthropic_version}
        if api_key:
            headers["x-api-key"] = api_key
        self._default_max_tokens = default_max_output_tokens
        super().__init__(provider=provider, base_url=base_url, models=models, headers=headers,
                         connect_timeout_s=connect_timeout_s, stream_idle_timeout_s=stream_idle_timeout_s,
                         deadline_margin_s=deadline_margin_s, max_connections=max_connections, transport=transport,
                         counter=counter)

    async def generate(self, request_id: str, model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                       deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        served = self._resolve(model)
        body = messages_body(served.upstream_name, messages, params, self._default_max_tokens)
        stream = _MessageStream(self.provider)
        output: list[str] = []
        self._running += 1
        try:
            async with aclosing(self._event_batches(request_id, MESSAGES_PATH, body, deadline)) as batches:
                async for batch in batches:
                    arrived = stream.read(batch)  # the deltas of one network read go out as one chunk
                    if arrived:
                        output.extend(arrived)
                        yield GenerationChunk(delta="".join(arrived))
                    if stream.stopped:
                        await self._drain(batches)
                        break
            if not stream.stopped and stream.finish is None:
                raise malformed("stream ended before message_stop")
            extra: dict[str, str] = {}
            if stream.have_usage:
                usage_out = TokenUsage(input_tokens=stream.input_tokens + stream.cache_read + stream.cache_write,
                                       output_tokens=stream.output_tokens, cached_input_tokens=stream.cache_read)
            else:
                usage_out, extra = self.counted_usage(messages, "".join(output))
            yield GenerationChunk(usage=usage_out, finish_reason=stream.finish or FinishReason.STOP,
                                  model=stream.reported_model or served.upstream_name, provider=self.provider,
                                  extra=extra)
        finally:
            self._running -= 1


class _MessageStream:
    """What a Messages API event stream said so far: text deltas, usage, stop reason."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.input_tokens = self.cache_read = self.cache_write = self.output_tokens = 0
        self.have_usage = False
        self.finish: FinishReason | None = None
        self.reported_model = ""
        self.stopped = False

    def read(self, batch: Sequence[SSEEvent]) -> list[str]:
        """The text deltas of one batch of events; stops at ``message_stop``."""
        arrived: list[str] = []
        for event in batch:
            if event.event == "ping":
                continue
            data = parse_json(event)
            kind = str(data.get("type") or event.event)
            if kind == "error":
                raise stream_error(self.provider, data.get("error"))
            if kind == "message_start":
                self._start(data)
            elif kind == "content_block_delta":
                delta = data.get("delta")
                if not isinstance(delta, dict):
                    raise malformed("content_block_delta without a delta")
                text = delta.get("text") if delta.get("type") == "text_delta" else None
                if isinstance(text, str) and text:
                    arrived.append(text)
            elif kind == "message_delta":
                self._delta(data)
            elif kind == "message_stop":
                self.stopped = True
                break
            # content_block_start / content_block_stop and unknown events carry nothing we need.
        return arrived

    def _start(self, data: dict[str, Any]) -> None:
        message = data.get("message")
        if not isinstance(message, dict):
            raise malformed("message_start without a message")
        self.reported_model = str(message.get("model") or "")
        usage = message.get("usage")
        if isinstance(usage, dict):
            self.have_usage = True
            self.input_tokens = as_int(usage.get("input_tokens"))
            self.cache_read = as_int(usage.get("cache_read_input_tokens"))
            self.cache_write = as_int(usage.get("cache_creation_input_tokens"))
            self.output_tokens = as_int(usage.get("output_tokens"))

    def _delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta")
        if isinstance(delta, dict) and delta.get("stop_reason"):
            self.finish = _FINISH.get(str(delta["stop_reason"]), FinishReason.STOP)
        usage = data.get("usage")
        if isinstance(usage, dict):
            # Cumulative counts; input fields appear here only in newer API versions.
            self.output_tokens = max(self.output_tokens, as_int(usage.get("output_tokens")))
            self.input_tokens = max(self.input_tokens, as_int(usage.get("input_tokens")))
            self.cache_read = max(self.cache_read, as_int(usage.get("cache_read_input_tokens")))
            self.cache_write = max(self.cache_write, as_int(usage.get("cache_creation_input_tokens")))
