"""OpenAI-compatible chat completions over HTTP (OpenAI, vLLM's server, Together, Groq, ...).

Always streams (``stream: true`` with ``stream_options.include_usage``), so the
first token reaches the caller as soon as the provider has it and the usage,
cached prompt tokens included, arrives in the last chunk. A provider that
sends no usage gets an estimate, marked on the final chunk
(``extra["usage_estimated"] == "true"``).
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
from services.inference.tokenizer import TokenCounter

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "content_filter": FinishReason.CONTENT_FILTER,
    "tool_calls": FinishReason.STOP,
    "function_call": FinishReason.STOP,
}

# OpenAI's "tool" role needs a tool_call_id we do not carry; tool output is passed as user text.
_ROLES = {Role.SYSTEM: "system", Role.USER: "user", Role.ASSISTANT: "assistant", Role.TOOL: "user"}


def chat_body(upstream_model: str, messages: Sequence[ChatMessage], params: GenerationParams) -> dict[str, Any]:
    out: list[dict[str, str]] = []
    for m in messages:
        item = {"role": _ROLES[m.role], "content": m.content}
        if m.name:
            item["name"] = m.name
        out.append(item)
    body: dict[str, Any] = {
        "model": upstream_model,
        "messages": out,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.max_output_tokens:
        body["max_tokens"] = params.max_output_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


class OpenAIHttpEngine(HttpEngineBase):
    def __init__(self, *, base_url: str, api_key: str, models: Sequence[ServedModel], provider: str = "openai",
                 connect_timeout_s: float = 5.0, stream_idle_timeout_s: float = 60.0,
                 deadline_margin_s: float = 0.02, max_connections: int = 100,
                 transport: httpx.AsyncBaseTransport | None = None, counter: TokenCounter | None = None):
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        super().__init__(provider=provider, base_url=base_url, models=models, headers=headers,
                         connect_timeout_s=connect_timeout_s, stream_idle_timeout_s=stream_idle_timeout_s,
                         deadline_margin_s=deadline_margin_s, max_connections=max_connections, transport=transport,
                         counter=counter)

    async def generate(self, request_id: str, model: str, messages: Sequence[ChatMessage], params: GenerationParams,
                       deadline: Deadline) -> AsyncIterator[GenerationChunk]:
        served = self._resolve(model)
        body = chat_body(served.upstream_name, messages, params)
        usage: TokenUsage | None = None
        finish: FinishReason | None = None
        reported_model = ""
        output: list[str] = []
        done = False
        self._running += 1
        try:
            async with aclosing(self._event_batches(request_id, CHAT_COMPLETIONS_PATH, body, deadline)) as batches:
                async for batch in batches:
                    arrived: list[str] = []  # the deltas of one network read go out as one chunk
                    for event in batch:
                        if event.data.strip() == "[DONE]":
                            done = True
                            break
                        data = parse_json(event)
                        if data.get("error") and not data.get("choices"):
                            raise stream_error(self.provider, data.get("error"))
                        reported_model = str(data.get("model") or reported_model)
                        if isinstance(data.get("usage"), dict):
                            usage = _usage(data["usage"])
                        choices = data.get("choices") or []
                        if not isinstance(choices, list):
                            raise malformed("choices is not a list")
                        for choice in choices:
                            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                                continue
                            delta = choice.get("delta") or {}
                            text = delta.get("content") if isinstance(delta, dict) else None
                            if isinstance(text, str) and text:
                                arrived.append(text)
                            reason = choice.get("finish_reason")
                            if reason:
                                finish = _FINISH.get(str(reason), FinishReason.STOP)
                    if arrived:
                        output.extend(arrived)
                        yield GenerationChunk(delta="".join(arrived))
                    if done:
                        await self._drain(batches)
                        break
            if finish is None and not done:
                raise malformed("stream ended before the generation finished")
            extra: dict[str, str] = {}
            if usage is None:
                usage, extra = self.counted_usage(messages, "".join(output))
            yield GenerationChunk(usage=usage, finish_reason=finish or FinishReason.STOP,
                                  model=reported_model or served.upstream_name, provider=self.provider, extra=extra)
        finally:
            self._running -= 1


def _usage(raw: dict[str, Any]) -> TokenUsage:
    details = raw.get("prompt_tokens_details")
    cached = as_int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    prompt = as_int(raw.get("prompt_tokens"))
    return TokenUsage(input_tokens=prompt, output_tokens=as_int(raw.get("completion_tokens")),
                      cached_input_tokens=min(cached, prompt))
