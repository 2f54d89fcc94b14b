"""A deterministic LLM provider over real HTTP: OpenAI chat completions and Anthropic messages, with faults.

Answers: ``"This is a fake answer. You said: <first six words of the last user
message>"`` (plus ``extra_words`` filler words), one word per streamed delta.
Token counts are whitespace-split word counts: prompt tokens = words in all
messages (system included), completion tokens = words in the answer. Cached
prompt tokens simulate a prefix cache: the words of the system prompt when the
same system prompt was seen before.

Faults are set at runtime with ``POST /_control`` (see :class:`FaultConfig`);
``GET /_control/state`` tells what happened (requests, active and cancelled
streams), so a test can check that no generation is left running after the
client gave up: a generation ends (``active_streams`` drops) as soon as the
client disconnects, even while it is hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import anyio
import anyio.lowlevel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

MODES = ("normal", "error_500", "rate_limit_429", "hang", "hang_mid_stream", "malformed_chunk", "split_chunks", "burst")
ANSWER_PREFIX = "This is a fake answer. You said:"
ECHO_WORDS = 6
FILLER_WORD = "lorem"
DEFAULT_MODELS = ("fake-small", "fake-large")


@dataclass
class FaultConfig:
    """What the next requests get; every field can be set with ``POST /_control``."""

    # normal | error_500 | rate_limit_429 | hang (no response head, ever) | hang_mid_stream (head and a first
    # delta, then silence) | malformed_chunk (a broken JSON event after the first delta) | split_chunks (the
    # body flushed in pieces of 1-7 bytes, splitting UTF-8 characters and `data:` lines) | burst (the whole
    # event stream in one write, as an upstream serving a file or batching events sends it). The last four
    # apply to streamed requests; a non-streamed request in hang_mid_stream mode hangs.
    mode: str = "normal"
    # Apply `mode` to the next N generation requests only, then go back to normal; 0 = until changed.
    fail_next_n: int = 0
    # Delay before the response head, and between streamed deltas.
    latency_ms: int = 0
    chunk_delay_ms: int = 0
    # Retry-After (seconds) sent with 429s; also sent with 500s when `retry_after_on_500` is set.
    retry_after_s: float = 1.0
    retry_after_on_500: bool = False
    # Filler words appended to the answer (long streams for cancellation tests).
    extra_words: int = 0
    # Replace the answer text entirely.
    reply: str | None = None
    # Leave usage out of OpenAI streams even when include_usage is asked for.
    omit_usage: bool = False


@dataclass
class ProviderState:
    config: FaultConfig = field(default_factory=FaultConfig)
    requests_total: int = 0
    active_streams: int = 0
    cancelled_streams: int = 0
    completed_streams: int = 0
    faults_injected: int = 0
    seen_system_prompts: set[str] = field(default_factory=set)
    client_ports: set[int] = field(default_factory=set)
    last_request: dict[str, Any] | None = None
    last_headers: dict[str, str] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "active_streams": self.active_streams,
            "cancelled_streams": self.cancelled_streams,
            "completed_streams": self.completed_streams,
            "faults_injected": self.faults_injected,
            "connections_seen": len(self.client_ports),
            "config": asdict(self.config),
            "last_request": self.last_request,
            "last_headers": self.last_headers,
        }

    def take_mode(self) -> str:
        """The fault mode for this request (counts down ``fail_next_n``)."""
        cfg = self.config
        mode = cfg.mode
        if mode != "normal":
            self.faults_injected += 1
            if cfg.fail_next_n > 0:
                cfg.fail_next_n -= 1
                if cfg.fail_next_n == 0:
                    cfg.mode = "normal"
        return mode


def count_words(text: str) -> int:
    return len(text.split())


@dataclass
class Answer:
    words: list[str]  # the streamed pieces: "This", " is", ...
    finish: str  # "stop" | "length"
    prompt_tokens: int
    cached_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.words)

    @property
    def completion_tokens(self) -> int:
        return count_words(self.text)


def make_answer(state: ProviderState, *, system: str, turns: list[tuple[str, str]], max_tokens: int | None,
                stop: list[str]) -> Answer:
    cfg = state.config
    last_user = next((content for role, content in reversed(turns) if role == "user"), "")
    if cfg.reply is not None:
        text = cfg.reply
    else:
        text = " ".join([ANSWER_PREFIX, *last_user.split()[:ECHO_WORDS], *([FILLER_WORD] * cfg.extra_words)])
    finish = "stop"
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    if max_tokens is not None and count_words(text) > max_tokens:
        text = " ".join(text.split()[:max_tokens])
        finish = "length"
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    prompt = count_words(system) + sum(count_words(c) for _, c in turns)
    cached = 0
    if system.strip():
        key = hashlib.sha256(system.encode()).hexdigest()
        if key in state.seen_system_prompts:
            cached = count_words(system)
        state.seen_system_prompts.add(key)
    return Answer(pieces, finish, prompt, min(cached, prompt))


# --- streaming that notices a client leaving -------------------------------------

class GenerationResponse(Response):
    """An ASGI response whose body comes from ``body``; it stops the moment the client disconnects.

    The response head is sent lazily with the first piece, so a body that never
    yields (``hang``) sends nothing at all. Counts active / cancelled / completed
    generations in ``state``.
    """

    def __init__(self, state: ProviderState, body: AsyncIterator[bytes], *, media_type: str,
                 headers: dict[str, str] | None = None):
        # Not Response.__init__: that would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.media_type = media_type
        self.raw_headers = [(b"content-type", media_type.encode())]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        self._state = state
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self._state
        state.active_streams += 1
        completed = False
        started = False
        try:
            async with anyio.create_task_group() as tg:
                async def watch_disconnect() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_disconnect)
                async for piece in self._body:
                    if not started:
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                        started = True
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
                    # uvicorn's send() is a silent no-op once the client is gone: let the watcher run.
                    await anyio.lowlevel.checkpoint()
                if not started:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
                tg.cancel_scope.cancel()
        except* OSError:
            pass  # the client went away mid-send
        finally:
            with contextlib.suppress(Exception):
                await self._body.aclose()  # type: ignore[attr-defined]
            state.active_streams -= 1
            if completed:
                state.completed_streams += 1
            else:
                state.cancelled_streams += 1


async def _sleep_ms(ms: int) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


def _split(data: bytes) -> list[bytes]:
    sizes = (1, 2, 3, 5, 7)
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i:i + n])
        i += n
        k += 1
    return out


def sse_line(obj: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def stream_events(state: ProviderState, mode: str, events: Iterable[bytes], *, hang_after: int = 1,
                        malformed: bytes = b"") -> AsyncIterator[bytes]:
    """Yield SSE event bytes with the configured latency and fault applied."""
    cfg = state.config
    await _sleep_ms(cfg.latency_ms)
    if mode == "burst":
        yield b"".join(events)
        return
    if mode == "split_chunks":
        for i, event in enumerate(events):
            if i:
                await _sleep_ms(cfg.chunk_delay_ms)
            for piece in _split(event):
                yield piece
                await asyncio.sleep(0)
        return
    for i, event in enumerate(events):
        if mode == "hang_mid_stream" and i == hang_after:
            await anyio.sleep_forever()
        if mode == "malformed_chunk" and i == hang_after:
            yield malformed
            return
        if i:
            await _sleep_ms(cfg.chunk_delay_ms)
        yield event


async def _hang_body(state: ProviderState) -> AsyncIterator[bytes]:
    await _sleep_ms(state.config.latency_ms)
    await anyio.sleep_forever()
    yield b""  # pragma: no cover


async def _json_body(state: ProviderState, payload: dict[str, Any]) -> AsyncIterator[bytes]:
    await _sleep_ms(state.config.latency_ms)
    yield json.dumps(payload, ensure_ascii=False).encode()


# --- request handling shared by both APIs --------------------------------------------

async def _read_json(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _auth_ok(request: Request, api_key: str | None, anthropic: bool) -> bool:
    if not api_key:
        return True
    if anthropic:
        return request.headers.get("x-api-key") == api_key
    return request.headers.get("authorization") == f"Bearer {api_key}"


def _error(status: int, message: str, *, anthropic: bool, kind: str, headers: dict[str, str] | None = None,
           ) -> JSONResponse:
    if anthropic:
        payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(payload, status_code=status, headers=headers)


async def _fault_response(state: ProviderState, mode: str, *, anthropic: bool) -> Response | None:
    cfg = state.config
    if mode in ("error_500", "rate_limit_429"):
        await _sleep_ms(cfg.latency_ms)
    if mode == "error_500":
        headers = {"retry-after": f"{cfg.retry_after_s:g}"} if cfg.retry_after_on_500 else None
        return _error(500, "injected server error", anthropic=anthropic,
                      kind="api_error" if anthropic else "server_error", headers=headers)
    if mode == "rate_limit_429":
        return _error(429, "injected rate limit", anthropic=anthropic,
                      kind="rate_limit_error" if anthropic else "rate_limit_exceeded",
                      headers={"retry-after": f"{cfg.retry_after_s:g}"})
    if mode == "hang":
        return GenerationResponse(state, _hang_body(state), media_type="text/event-stream")
    return None


def _text_of(content: Any) -> str:
    """A message's text: a string, or Anthropic-style content blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return ""


async def _received(request: Request) -> tuple[ProviderState, str | None, dict[str, Any] | None]:
    """Count and remember a generation request (both APIs): what the control endpoint reports."""
    state: ProviderState = request.app.state.provider
    state.requests_total += 1
    if request.client:
        state.client_ports.add(request.client.port)
    body = await _read_json(request)
    state.last_request = body
    state.last_headers = {k: v for k, v in request.headers.items() if k in ("x-request-id", "anthropic-version")}
    return state, request.app.state.api_key, body


# --- OpenAI ------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    state, api_key, body = await _received(request)
    if not _auth_ok(request, api_key, anthropic=False):
        return _error(401, "invalid api key", anthropic=False, kind="invalid_request_error")
    if body is None or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(400, "messages must be a non-empty list", anthropic=False, kind="invalid_request_error")
    model = str(body.get("model") or "")
    if not model:
        return _error(400, "model is required", anthropic=False, kind="invalid_request_error")
    mode = state.take_mode()
    fault = await _fault_response(state, mode, anthropic=False)
    if fault is not None:
        return fault

    system = " ".join(_text_of(m.get("content")) for m in body["messages"] if m.get("role") == "system")
    turns = [(str(m.get("role")), _text_of(m.get("content"))) for m in body["messages"] if m.get("role") != "system"]
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    stop = body.get("stop") or []
    answer = make_answer(state, system=system, turns=turns, max_tokens=max_tokens,
                         stop=[stop] if isinstance(stop, str) else list(stop))
    usage = {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
    }
    cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    created = int(time.time())

    if not body.get("stream"):
        payload = {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish}],
            "usage": usage,
        }
        if mode == "hang_mid_stream":
            return GenerationResponse(state, _hang_body(state), media_type="application/json")
        return GenerationResponse(state, _json_body(state, payload), media_type="application/json")

    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not state.config.omit_usage

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            obj["usage"] = None
        return sse_line(obj)

    tail = [chunk({}, answer.finish)]
    if include_usage:
        tail.append(sse_line({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                              "choices": [], "usage": usage}))
    tail.append(b"data: [DONE]\n\n")
    events = itertools.chain(
        [b": fake-provider stream\n\n", chunk({"role": "assistant", "content": ""}, None)],
        (chunk({"content": w}, None) for w in answer.words),  # lazily: answers can be very long
        tail,
    )
    malformed = b'data: {"id": "' + cid.encode() + b'", "choices": [{"delta": {"content": "x\n\n'
    return GenerationResponse(state, stream_events(state, mode, events, hang_after=3, malformed=malformed),
                              media_type="text/event-stream", headers={"cache-control": "no-cache"})


async def list_models(request: Request) -> Response:
    names: tuple[str, ...] = request.app.state.models
    return JSONResponse({"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "fake-provider"} for n in names]})


# --- Anthropic ----------------------------------------------------------------------

async def messages(request: Request) -> Response:
    state, api_key, body = await _received(request)
    if not _auth_ok(request, api_key, anthropic=True):
        return _error(401, "invalid x-api-key", anthropic=True, kind="authentication_error")
    if body is None or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _error(400, "messages: field required", anthropic=True, kind="invalid_request_error")
    if not isinstance(body.get("max_tokens"), int):
        return _error(400, "max_tokens: field required", anthropic=True, kind="invalid_request_error")
    if any(m.get("role") not in ("user", "assistant") for m in body["messages"]):
        return _error(400, "messages: roles must be user or assistant", anthropic=True, kind="invalid_request_error")
    model = str(body.get("model") or "")
    mode = state.take_mode()
    fault = await _fault_response(state, mode, anthropic=True)
    if fault is not None:
        return fault

    system = _text_of(body.get("system") or "")
    turns = [(str(m["role"]), _text_of(m.get("content"))) for m in body["messages"]]
    answer = make_answer(state, system=system, turns=turns, max_tokens=body["max_tokens"],
                         stop=list(body.get("stop_sequences") or []))
    stop_reason = "max_tokens" if answer.finish == "length" else "end_turn"
    mid = f"msg_{uuid.uuid4().hex[:12]}"
    uncached = answer.prompt_tokens - answer.cached_tokens
    start_usage = {"input_tokens": uncached, "output_tokens": 1, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": answer.cached_tokens}

    if not body.get("stream"):
        payload = {
            "id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": answer.text}],
            "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {**start_usage, "output_tokens": answer.completion_tokens},
        }
        return GenerationResponse(state, _json_body(state, payload), media_type="application/json")

    head = [
        sse_line({"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "content": [], "model": model,
            "stop_reason": None, "stop_sequence": None, "usage": start_usage}}, "message_start"),
        sse_line({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                 "content_block_start"),
        sse_line({"type": "ping"}, "ping"),
    ]
    tail = [
        sse_line({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse_line({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                  "usage": {"output_tokens": answer.completion_tokens}}, "message_delta"),
        sse_line({"type": "message_stop"}, "message_stop"),
    ]
    events = itertools.chain(head, (
        sse_line({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                 "content_block_delta") for w in answer.words), tail)
    malformed = b'event: content_block_delta\ndata: {"type": "content_block_delta", "delta": {\n\n'
    return GenerationResponse(state, stream_events(state, mode, events, hang_after=4, malformed=malformed),
                              media_type="text/event-stream", headers={"cache-control": "no-cache"})


# --- control --------------------------------------------------------------------------

_CONFIG_FIELDS = {f.name for f in fields(FaultConfig)}


async def control(request: Request) -> Response:
    state: ProviderState = request.app.state.provider
    body = await _read_json(request)
    if body is None:
        return JSONResponse({"error": "expected a JSON object"}, status_code=400)
    try:
        apply_control(state, body)
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(state.snapshot())


def apply_control(state: ProviderState, body: dict[str, Any]) -> None:
    """``{"reset": true}`` clears config and counters; other keys update :class:`FaultConfig` fields."""
    unknown = set(body) - _CONFIG_FIELDS - {"reset"}
    if unknown:
        raise ValueError(f"unknown control fields: {sorted(unknown)}")
    if body.get("mode", "normal") not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if body.get("reset"):
        active = state.active_streams
        fresh = ProviderState()
        state.__dict__.update(fresh.__dict__)
        state.active_streams = active
    for key, value in body.items():
        if key != "reset":
            setattr(state.config, key, value)


async def control_state(request: Request) -> Response:
    return JSONResponse(request.app.state.provider.snapshot())


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


def create_app(state: ProviderState | None = None, *, api_key: str | None = None,
               models: tuple[str, ...] = DEFAULT_MODELS) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/_control", control, methods=["POST"]),
        Route("/_control/state", control_state, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
    ])
    app.state.provider = state or ProviderState()
    app.state.api_key = api_key
    app.state.models = models
    return app

