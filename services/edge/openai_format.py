"""OpenAI chat-completions JSON <-> RouterService protobufs, and errors -> OpenAI error bodies.

Pure functions, no I/O and no gRPC: the request body (bytes) becomes a ``GenerationInput``; a
``GenerateResponse`` becomes a ``chat.completion`` object; stream events become
``chat.completion.chunk`` SSE frames; a domain error (with the gRPC status code name it arrived
with) becomes an HTTP status, headers and ``{"error": {...}}`` body.

Only types are checked here (wrong types are a 400 before the router is called); value ranges
(temperature, max tokens, message count, known models) are the router's to judge, and its field
violations are renamed to the OpenAI parameter names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2

from libs.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    TollgateError,
    Unauthenticated,
    Unavailable,
)


def _json_codec() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]]:
    """orjson when installed (several times faster), else the standard library, compact either way."""
    try:
        import orjson
    except ImportError:
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
        return (lambda obj: encoder.encode(obj).encode()), json.loads
    return orjson.dumps, orjson.loads


dumps, loads = _json_codec()

# --- request --------------------------------------------------------------------

_ROLES = {
    "system": common_pb2.MESSAGE_ROLE_SYSTEM,
    "developer": common_pb2.MESSAGE_ROLE_SYSTEM,  # OpenAI's newer name for system instructions
    "user": common_pb2.MESSAGE_ROLE_USER,
    "assistant": common_pb2.MESSAGE_ROLE_ASSISTANT,
    "tool": common_pb2.MESSAGE_ROLE_TOOL,
}
_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
# Tollgate's cache-control extension: header `x-tollgate-cache` or body field `tollgate_cache`.
CACHE_HEADER = "x-tollgate-cache"
CACHE_FIELD = "tollgate_cache"
_CACHE_TOKENS = ("no-cache", "no-store")


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A parsed ``POST /v1/chat/completions``."""

    input: router_pb2.GenerationInput
    stream: bool
    include_usage: bool


def _bad(param: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(param, description)], f"{param}: {description}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        data = None
    if not isinstance(data, dict):
        error = InvalidArgument([], "the request body must be a JSON object")
        error.reason = "INVALID_JSON"
        raise error
    return data


def _content(value: object, param: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:  # an assistant turn that only called tools
        return ""
    if not isinstance(value, list):
        raise _bad(param, "must be a string or a list of content parts")
    texts: list[str] = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise _bad(f"{param}[{j}]", "must be an object")
        if part.get("type") != "text":
            raise _bad(f"{param}[{j}].type", f"content part type {part.get('type')!r} is not supported; "
                                            "only 'text'")
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{param}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _messages(value: object) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list):
        raise _bad("messages", "must be a list of messages")
    out: list[common_pb2.ChatMessage] = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role_name = m.get("role")
        role = _ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise _bad(f"messages[{i}].role", "must be one of system, developer, user, assistant, tool")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(f"messages[{i}].name", "must be a string")
        out.append(common_pb2.ChatMessage(role=role, content=_content(m.get("content"), f"messages[{i}].content"),
                                          name=name or ""))
    return out


def _cache_control(value: object, param: str) -> router_pb2.CacheControl:
    if isinstance(value, str):
        tokens = [t.strip().lower() for t in value.split(",")]
    elif isinstance(value, list) and all(isinstance(t, str) for t in value):
        tokens = [t.strip().lower() for t in value]
    else:
        raise _bad(param, "must be a string like 'no-cache, no-store' or a list of such")
    for t in tokens:
        if t and t not in _CACHE_TOKENS:
            raise _bad(param, f"unknown directive {t!r}; use no-cache and/or no-store")
    return router_pb2.CacheControl(no_cache="no-cache" in tokens, no_store="no-store" in tokens)


def _params(data: dict[str, Any]) -> common_pb2.GenerationParams:
    p = common_pb2.GenerationParams()
    for name in ("temperature", "top_p"):
        value = data.get(name)
        if value is not None:
            if not _is_number(value):
                raise _bad(name, "must be a number")
            setattr(p, name, value)
    max_completion = data.get("max_completion_tokens")
    limit_param = "max_completion_tokens" if max_completion is not None else "max_tokens"
    limit = max_completion if max_completion is not None else data.get("max_tokens")
    if limit is not None:
        if not _is_int(limit) or not 0 <= limit <= _UINT32_MAX:
            raise _bad(limit_param, "must be a non-negative integer")
        p.max_output_tokens = limit
    stop = data.get("stop")
    if isinstance(stop, str):
        if stop:
            p.stop.append(stop)
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise _bad("stop", "must be a string or a list of strings")
        p.stop.extend(s for s in stop if s)
    elif stop is not None:
        raise _bad("stop", "must be a string or a list of strings")
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= _UINT64_MAX:
            raise _bad("seed", "must be a non-negative integer")
        p.seed = seed
    return p


def chat_request(body: bytes, *, cache_header: str | None = None) -> ChatCall:
    """Parse and type-check a chat-completions body; ``InvalidArgument`` (one violation) when it is wrong."""
    data = parse_json_object(body)
    model = data.get("model")
    if not isinstance(model, str):
        raise _bad("model", "is required and must be a string")
    n = data.get("n")
    if n is not None and n != 1:
        raise _bad("n", "only n=1 is supported")
    for unsupported in ("tools", "functions"):
        if data.get(unsupported):
            raise _bad(unsupported, "tool calling is not supported by this gateway")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "must be an object like {\"include_usage\": true}")
        include_usage = bool(options.get("include_usage", False))
    user = data.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user", "must be a string")
    fallbacks = data.get("fallback_models")
    if fallbacks is not None and not (isinstance(fallbacks, list) and all(isinstance(f, str) for f in fallbacks)):
        raise _bad("fallback_models", "must be a list of model names")
    inp = router_pb2.GenerationInput(model=model, messages=_messages(data.get("messages")), params=_params(data),
                                     user_id=user or "", fallback_models=fallbacks or ())
    cache = data.get(CACHE_FIELD)
    if cache is not None:
        inp.cache_control.CopyFrom(_cache_control(cache, CACHE_FIELD))
    elif cache_header is not None:
        inp.cache_control.CopyFrom(_cache_control(cache_header, CACHE_HEADER))
    return ChatCall(inp, stream, include_usage)


def request_timeout(header: str | None, *, default_s: float, max_s: float) -> float:
    """The gRPC timeout for a call: the `x-request-timeout` header (seconds) or the default, at most max."""
    if header is None:
        return default_s if default_s < max_s else max_s
    try:
        value = float(header)
    except ValueError:
        raise _bad("x-request-timeout", "must be a number of seconds") from None
    if not value > 0 or math.isinf(value):
        raise _bad("x-request-timeout", "must be a positive number of seconds")
    return value if value < max_s else max_s


# --- responses ------------------------------------------------------------------

def _enum_names(enum: Any, prefix: str) -> dict[int, str]:
    return {v.number: v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values}


_FINISH = _enum_names(common_pb2.FinishReason, "FINISH_REASON_")
_FINISH[common_pb2.FINISH_REASON_UNSPECIFIED] = "stop"
_CACHE_TIER = _enum_names(common_pb2.CacheTier, "CACHE_TIER_")
_DEGRADED = _enum_names(router_pb2.DegradedReason, "DEGRADED_REASON_")
_LEVEL = _enum_names(router_pb2.DegradationLevel, "DEGRADATION_LEVEL_")


def finish_reason(value: int) -> str:
    """OpenAI's finish_reason: stop, length, content_filter (cancelled/error only on abnormal ends)."""
    return _FINISH.get(value, "stop")


def usage(u: common_pb2.TokenUsage) -> dict[str, Any]:
    return {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
            "total_tokens": u.input_tokens + u.output_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens}}


def tollgate_extra(s: router_pb2.GenerationSummary) -> dict[str, Any]:
    """The gateway's own account of the request (top-level field ``tollgate``; the openai client keeps extras)."""
    return {
        "request_id": s.request_id, "provider": s.provider, "cost_nano_usd": s.cost_nano_usd,
        "saved_nano_usd": s.saved_nano_usd, "cache_tier": _CACHE_TIER.get(s.cache_tier, "unspecified"),
        "degraded": s.degraded, "degraded_reasons": [_DEGRADED.get(r, "unspecified") for r in s.degraded_reasons],
        "degradation_level": _LEVEL.get(s.degradation_level, "unspecified"), "degraded_detail": s.degraded_detail,
        "route_reason": s.route_reason, "attempts": s.attempts, "variant": s.variant,
        "price_version": s.price_version,
    }


def completion(resp: router_pb2.GenerateResponse, created: int) -> dict[str, Any]:
    """A ``chat.completion`` object for a unary Generate."""
    s = resp.summary
    return {
        "id": "chatcmpl-" + s.request_id, "object": "chat.completion", "created": created, "model": s.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": resp.content}, "logprobs": None,
                     "finish_reason": finish_reason(s.finish_reason)}],
        "usage": usage(s.usage), "tollgate": tollgate_extra(s),
    }


DONE = b"data: [DONE]\n\n"


class ChunkEncoder:
    """SSE frames of one streamed completion: deltas (the first carries the role), the finishing chunk, usage.

    The router's request id arrives only with the summary, at the end, so the chunks' ``id`` is chosen by
    the edge (``completion_id``) and the router's id is in the finishing chunk's ``tollgate.request_id``.
    Deltas name the requested model; the finishing and usage chunks name the model that answered.
    """

    __slots__ = ("_created", "_first", "_first_prefix", "_id", "_prefix")

    _SUFFIX = b'},"logprobs":null,"finish_reason":null}]}\n\n'

    def __init__(self, completion_id: str, model: str, created: int):
        self._id, self._created = completion_id, created
        head = b"data: " + dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                  "model": model})[:-1] + b',"choices":[{"index":0,"delta":{'
        self._prefix = head + b'"content":'
        self._first_prefix = head + b'"role":"assistant","content":'
        self._first = True

    def delta(self, text: str) -> bytes:
        if self._first:
            self._first = False
            return self._first_prefix + dumps(text) + self._SUFFIX
        return self._prefix + dumps(text) + self._SUFFIX

    def _chunk(self, model: str, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + dumps({"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                                  "model": model, "choices": choices, **extra}) + b"\n\n"

    def finish(self, s: router_pb2.GenerationSummary, *, include_usage: bool) -> bytes:
        """The finishing chunk (finish_reason, ``tollgate``), the usage chunk if asked for, then ``[DONE]``."""
        out = self.delta("") if self._first else b""
        out += self._chunk(s.model, [{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": finish_reason(s.finish_reason)}],
                           tollgate=tollgate_extra(s))
        if include_usage:
            out += self._chunk(s.model, [], usage=usage(s.usage))
        return out + DONE


def models_list(resp: router_pb2.ListAvailableModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in resp.models]}


def model_object(m: router_pb2.AvailableModel) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": 0, "owned_by": m.provider or "tollgate"}


# --- errors ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def sse(self) -> bytes:
        """The error as an SSE event, for a stream that had already started."""
        return b"data: " + dumps(self.body) + b"\n\n"


def error_body(status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> ErrorReply:
    return ErrorReply(status, {"error": {"message": message, "type": type_, "param": param, "code": code}},
                      headers or {})


# gRPC status code name -> HTTP status and OpenAI error type.
_BY_CODE: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "ALREADY_EXISTS": (409, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "server_error"),
    # The router cancels in-flight calls when it shuts down past its grace period: retry elsewhere.
    "CANCELLED": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
}
_INTERNAL = (500, "server_error")
# The code a domain error raised at the edge itself stands for.
_CODE_OF: list[tuple[type[TollgateError], str]] = [
    (InvalidArgument, "INVALID_ARGUMENT"), (Unauthenticated, "UNAUTHENTICATED"),
    (PermissionDenied, "PERMISSION_DENIED"), (NotFound, "NOT_FOUND"), (AlreadyExists, "ALREADY_EXISTS"),
    (FailedPrecondition, "FAILED_PRECONDITION"), (QuotaExceeded, "RESOURCE_EXHAUSTED"),
    (Overloaded, "RESOURCE_EXHAUSTED"), (Unavailable, "UNAVAILABLE"), (DeadlineExceeded, "DEADLINE_EXCEEDED"),
]
_PARAM_RENAMES = {"max_output_tokens": "max_tokens", "user_id": "user", "cache_control": CACHE_HEADER}
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


def openai_param(field_path: str) -> str:
    """A router field path as the OpenAI parameter: ``input.params.max_output_tokens`` -> ``max_tokens``."""
    path = field_path.removeprefix("input.").removeprefix("params.")
    head, sep, rest = path.partition(".")
    if head == "cache_control":
        return CACHE_HEADER
    return _PARAM_RENAMES.get(head, head) + sep + rest


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, at least 1) and ``retry-after-ms`` (the openai client
    prefers it) from a RetryInfo delay."""
    return {"retry-after": str(max(1, math.ceil(round(seconds, 3)))),
            "retry-after-ms": str(max(1, math.ceil(round(seconds * 1000, 3))))}


def error_reply(error: TollgateError, code: str | None = None) -> ErrorReply:
    """The OpenAI-style error for a domain error; ``code`` is the gRPC status code name it came with
    (``err.code().name``), or None for an error raised at the edge."""
    if code is None:
        code = next((c for cls, c in _CODE_OF if isinstance(error, cls)), "INTERNAL")
    status, type_ = _BY_CODE.get(code, _INTERNAL)
    headers: dict[str, str] = {}
    param: str | None = None
    message = error.message
    reason = (error.reason or code).lower()
    if status == 400 and isinstance(error, InvalidArgument):
        if error.violations:
            params = [(openai_param(v.field), v.description) for v in error.violations]
            param = params[0][0]
            message = "; ".join(f"{p}: {d}" for p, d in params)
        if error.violations:
            reason = "invalid_value"
    elif status == 401:
        reason = "invalid_api_key"
    elif status == 429:
        reason = "insufficient_quota" if error.reason == BUDGET_EXHAUSTED else "rate_limit_exceeded"
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is not None and status in (429, 503):
        headers = retry_after_headers(retry_after)
    if status == 500:
        message, reason = "internal error in the gateway", "internal_error"
    return error_body(status, message, type_, param=param, code=reason, headers=headers)
