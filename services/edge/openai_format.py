"""OpenAI chat-completions JSON <-> RouterService protobufs, and errors -> OpenAI error bodies.

Pure functions, no I/O and no gRPC: the request body (bytes) becomes a ``GenerationInput``; a
``GenerateResponse`` becomes a ``chat.completion`` object; stream events become
``chat.completion.chunk`` SSE frames; a domain error (with the gRPC status code name it arrived
with) becomes an HTTP status, headers and ``{"error": {...}}`` body.

Checked here, before the router is called: that the body is strict JSON (UTF-8, no NaN/Infinity, no
number that overflows a double, no lone surrogate, bounded nesting), the types of the fields, and the
router's size limits (:data:`LIMITS`, the same numbers the router enforces) so an oversized request
costs no gRPC call. Value ranges (temperature, max tokens, known models) are the router's to judge,
and its field violations are renamed to the OpenAI parameter names.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2

from libs import chat
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
    Violations,
)
from libs.validation import (
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    check_labels,
    check_name,
    check_no_nul,
    check_text,
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


# The router's limits on a GenerationInput (the shared ones from libs.chat / libs.validation; the router's
# own in services/router/limits.py, which the edge does not import), enforced here too so an oversized
# request costs no gRPC call and the 400 names the OpenAI parameter. tests/fuzz/test_fuzz_edge.py checks
# that the running router refuses one past each limit and takes one at it.
MAX_MESSAGES = chat.MAX_MESSAGES  # 256
MAX_MESSAGE_CHARS = chat.MAX_MESSAGES_CHARS  # 1,000,000: all messages' content together, in code points
MAX_MESSAGE_NAME_CHARS = chat.MAX_MESSAGE_NAME_CHARS  # 64
MAX_STOP = chat.MAX_STOP_SEQUENCES  # 8
MAX_STOP_CHARS = chat.MAX_STOP_CHARS  # 128
MAX_MODEL_NAME_CHARS = 128  # model, fallback_models[] (the router's MAX_MODEL_NAME_CHARS)
MAX_FALLBACK_MODELS = 4  # the router's MAX_FALLBACK_MODELS
MAX_USER_CHARS = 256  # the router's MAX_USER_ID_CHARS
# Not the router's: how deeply the JSON body may nest (chat bodies nest about 5 levels; a JSON schema in
# an ignored field such as response_format a few dozen). Deeper bodies are refused before any field is read.
MAX_JSON_DEPTH = 128
LIMITS: dict[str, int] = {
    "messages": MAX_MESSAGES, "messages_chars": MAX_MESSAGE_CHARS, "message_name_chars": MAX_MESSAGE_NAME_CHARS,
    "stop": MAX_STOP, "stop_chars": MAX_STOP_CHARS, "model_chars": MAX_MODEL_NAME_CHARS,
    "fallback_models": MAX_FALLBACK_MODELS, "user_chars": MAX_USER_CHARS, "metadata_entries": MAX_LABELS,
    "metadata_key_chars": MAX_LABEL_KEY_CHARS, "metadata_value_chars": MAX_LABEL_VALUE_CHARS,
    "json_depth": MAX_JSON_DEPTH,
}


INVALID_JSON = "INVALID_JSON"


def _bad(param: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(param, description)], f"{param}: {description}")


def _bad_json(description: str, param: str | None = None) -> InvalidArgument:
    """A body that is not the strict JSON this API takes: 400 ``invalid_json``, naming where when known."""
    violations = [FieldViolation(param, description)] if param else []
    error = InvalidArgument(violations, f"{param}: {description}" if param else description)
    error.reason = INVALID_JSON
    return error


def _short(value: object) -> str:
    """A caller's value quoted in an error message, cut short (it may be megabytes)."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _BadNumber:
    """Stands in for NaN/Infinity tokens and numbers that overflow a double until the walk names the field."""

    __slots__ = ("token",)

    def __init__(self, token: str):
        self.token = token


def _refuse_constant(token: str) -> _BadNumber:
    return _BadNumber(token)  # NaN, Infinity, -Infinity: Python's json accepts them, JSON does not


def _finite_float(text: str) -> float | _BadNumber:
    value = float(text)
    return value if math.isfinite(value) else _BadNumber(text)


def _strict_loads() -> Callable[[str], Any]:
    """orjson when installed (it refuses NaN/Infinity itself), else the standard library with NaN/Infinity and
    overflowing numbers marked for :func:`_check_tree`, which refuses them naming the field. Chosen once."""
    try:
        import orjson
    except ImportError:
        return json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float).decode
    return orjson.loads  # type: ignore[no-any-return]


_loads_strict = _strict_loads()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_problem(value: object) -> str | None:
    """What is wrong with one scalar of the parsed body, or None."""
    if isinstance(value, str):
        # JSON text is UTF-8, so a surrogate can only come from a \\uD8xx escape with no partner: protobuf
        # (UTF-8) cannot carry it.
        if not value.isascii() and _SURROGATE.search(value):
            return "contains a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"
        return None
    if isinstance(value, _BadNumber):
        return f"{_short(value.token)[1:-1]} is not a finite JSON number"
    if isinstance(value, float) and not math.isfinite(value):
        return "is not a finite JSON number"
    return None


def _path_to_problem(data: object, path: str = "", depth: int = 1) -> tuple[str, str] | None:
    """The first bad scalar's path and description, once :func:`_check_tree` found one (it is no deeper than
    MAX_JSON_DEPTH, so neither is this recursion)."""
    if depth > MAX_JSON_DEPTH:
        return None
    if isinstance(data, dict):
        for key, item in data.items():
            problem = _json_problem(key)
            if problem is not None:
                return path, f"a key {problem}"
            found = _path_to_problem(item, f"{path}.{key}" if path else key, depth + 1)
            if found:
                return found
        return None
    if isinstance(data, list):
        for i, item in enumerate(data):
            found = _path_to_problem(item, f"{path}[{i}]", depth + 1)
            if found:
                return found
        return None
    problem = _json_problem(data)
    return (path, problem) if problem is not None else None


def _check_tree(data: object) -> None:
    """Depth, lone surrogates and non-finite numbers anywhere in the body (iterative: no recursion limit;
    the common scalars take the fast paths, a 16 MiB body is walked in well under a second)."""
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(data, 1)] if isinstance(data, dict | list) else []
    bad = _json_problem(data) is not None
    while stack and not bad:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad_json(f"the request body nests more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, dict):
            bad = any(not k.isascii() and _json_problem(k) is not None for k in node)
            items: Any = node.values()
        else:
            items = node
        for item in items:
            kind = type(item)
            if kind is str:
                if item.isascii() or _json_problem(item) is None:
                    continue
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))
                continue
            elif kind is int or kind is bool or item is None or _json_problem(item) is None:
                continue
            bad = True
            break
    if bad:
        found = _path_to_problem(data)
        assert found is not None
        raise _bad_json(found[1], found[0] or None)  # the body's own keys: no param


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, strictly: UTF-8, RFC 8259 numbers and strings, bounded nesting."""
    try:
        # One leading byte order mark is ignored, as RFC 8259 allows (some Windows tools write one).
        text = body.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError:
        raise _bad_json("the request body is not valid UTF-8") from None
    try:
        data = _loads_strict(text)
    except RecursionError:  # the standard library's parser, past the interpreter's recursion limit
        raise _bad_json(f"the request body nests more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError (position only: the message may quote the body)
        where = f" at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise _bad_json(f"the request body is not valid JSON{where}") from None
    if not isinstance(data, dict):
        raise _bad_json("the request body must be a JSON object")
    _check_tree(data)
    return data


def _raise_first(v: Violations) -> None:
    if v.items:
        first = v.items[0]
        raise _bad(first.field, first.description)


def _name(value: object, param: str, max_chars: int, *, what: str = "a string", required: bool = False) -> str:
    """An identifier-like string (model, name, user): bounded, one line, no control characters."""
    if not isinstance(value, str):
        raise _bad(param, f"must be {what}")
    v = Violations()
    check_name(v, value, param, max_chars=max_chars, required=required)
    _raise_first(v)
    return value


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
            raise _bad(f"{param}[{j}].type", f"content part type {_short(part.get('type'))} is not supported; "
                                            "only 'text'")
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{param}[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)


def _messages(value: object) -> list[common_pb2.ChatMessage]:
    if not isinstance(value, list):
        raise _bad("messages", "must be a list of messages")
    if len(value) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    out: list[common_pb2.ChatMessage] = []
    total = 0
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object")
        role_name = m.get("role")
        role = _ROLES.get(role_name) if isinstance(role_name, str) else None
        if role is None:
            raise _bad(f"messages[{i}].role", "must be one of system, developer, user, assistant, tool")
        name = m.get("name")
        if name is not None:
            _name(name, f"messages[{i}].name", MAX_MESSAGE_NAME_CHARS)
        content = _content(m.get("content"), f"messages[{i}].content")
        total += len(content)
        if total > MAX_MESSAGE_CHARS:
            raise _bad("messages", f"messages exceed {MAX_MESSAGE_CHARS} characters in total")
        nul = Violations()  # free text, but no backend or store can carry NUL (the router refuses it too)
        check_no_nul(nul, content, f"messages[{i}].content")
        _raise_first(nul)
        out.append(common_pb2.ChatMessage(role=role, content=content, name=name or ""))
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
            raise _bad(param, f"unknown directive {_short(t)}; use no-cache and/or no-store")
    return router_pb2.CacheControl(no_cache="no-cache" in tokens, no_store="no-store" in tokens)


def _float(value: object, param: str) -> float:
    if not _is_number(value):
        raise _bad(param, "must be a number")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond a double
        raise _bad(param, "must be a finite number") from None
    return number


def _stops(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        items = [("stop", value)]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP:
            raise _bad("stop", f"at most {MAX_STOP} stop sequences")
        items = [(f"stop[{i}]", s) for i, s in enumerate(value)]
    else:
        raise _bad("stop", "must be a string or a list of strings")
    v = Violations()
    for param, text in items:
        check_text(v, text, param, max_chars=MAX_STOP_CHARS)
    _raise_first(v)
    return [text for _, text in items if text]  # an empty one stops nothing: dropped


def _params(data: dict[str, Any]) -> common_pb2.GenerationParams:
    p = common_pb2.GenerationParams()
    for name in ("temperature", "top_p"):
        value = data.get(name)
        if value is not None:
            setattr(p, name, _float(value, name))
    max_completion = data.get("max_completion_tokens")
    limit_param = "max_completion_tokens" if max_completion is not None else "max_tokens"
    limit = max_completion if max_completion is not None else data.get("max_tokens")
    if limit is not None:
        if not _is_int(limit) or not 0 <= limit <= _UINT32_MAX:
            raise _bad(limit_param, "must be a non-negative integer")
        p.max_output_tokens = limit
    p.stop.extend(_stops(data.get("stop")))
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or not 0 <= seed <= _UINT64_MAX:
            raise _bad("seed", "must be a non-negative integer")
        p.seed = seed
    return p


def _fallbacks(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad("fallback_models", "must be a list of model names")
    if len(value) > MAX_FALLBACK_MODELS:
        raise _bad("fallback_models", f"at most {MAX_FALLBACK_MODELS} fallbacks")
    return [_name(f, f"fallback_models[{i}]", MAX_MODEL_NAME_CHARS, what="a model name", required=True)
            for i, f in enumerate(value)]


def _labels(value: object) -> dict[str, str]:
    """OpenAI's ``metadata`` (string to string), copied to the usage ledger as the request's labels."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(x, str) for x in value.values()):
        raise _bad("metadata", "must be an object of string values")
    v = Violations()
    check_labels(v, value, "metadata")
    _raise_first(v)
    return value


def chat_request(body: bytes, *, cache_header: str | None = None) -> ChatCall:
    """Parse and check a chat-completions body; ``InvalidArgument`` (one violation) when it is wrong."""
    data = parse_json_object(body)
    model = data.get("model")
    if model is None:
        raise _bad("model", "is required and must be a string")
    _name(model, "model", MAX_MODEL_NAME_CHARS)  # empty: the router's "required", with its hint
    n = data.get("n")
    if n is not None and not (_is_int(n) and n == 1):
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
    if user is not None:
        _name(user, "user", MAX_USER_CHARS)
    inp = router_pb2.GenerationInput(model=model, messages=_messages(data.get("messages")), params=_params(data),
                                     user_id=user or "", fallback_models=_fallbacks(data.get("fallback_models")),
                                     labels=_labels(data.get("metadata")))
    cache = data.get(CACHE_FIELD)
    if cache is not None:
        inp.cache_control.CopyFrom(_cache_control(cache, CACHE_FIELD))
    elif cache_header is not None:
        inp.cache_control.CopyFrom(_cache_control(cache_header, CACHE_HEADER))
    return ChatCall(inp, stream, include_usage)


_JSON_READABLE_MEDIA = frozenset({"application/json", "application/x-www-form-urlencoded", "text/plain"})


def unsupported_media(content_type: str | None, content_encoding: str | None) -> ErrorReply | None:
    """415 unless the body can be read as JSON: ``application/json`` (charset utf-8 if one is named), no
    Content-Type at all, or the two types that tools send by default for a raw body (``curl -d`` sends
    ``application/x-www-form-urlencoded``, some clients ``text/plain``), as OpenAI's API accepts them;
    no Content-Encoding but ``identity``. The body is parsed as strict JSON either way."""
    if content_encoding is not None and content_encoding.strip().lower() not in ("", "identity"):
        return error_body(415, "Content-Encoding is not supported; send the JSON body uncompressed",
                          "invalid_request_error", code="unsupported_media_type")
    if content_type is None:
        return None
    media, _, params = content_type.partition(";")
    charset = ""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media.strip().lower() in _JSON_READABLE_MEDIA and charset in ("", "utf-8", "utf8"):
        return None
    return error_body(415, f"Content-Type {_short(content_type)} is not supported; send 'application/json' "
                           "(UTF-8)", "invalid_request_error", code="unsupported_media_type")


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

# Every response names its request: the router's id when the router assigned one (the usage ledger's key),
# else one the edge made up (refused before the router, router unreachable). A client's own x-request-id is
# never used as ours; a well-formed one is echoed back as x-client-request-id.
REQUEST_ID_HEADER = "x-request-id"
CLIENT_REQUEST_ID_HEADER = "x-client-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    """An edge-made id, shaped like the router's (32 hex digits)."""
    return uuid.uuid4().hex


def client_request_id(value: str | None) -> str | None:
    """The caller's x-request-id when it is 1-128 of ``[A-Za-z0-9._:-]``; None otherwise (dropped)."""
    return value if value is not None and _CLIENT_REQUEST_ID.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def sse(self) -> bytes:
        """The error as an SSE event, for a stream that had already started."""
        return b"data: " + dumps(self.body) + b"\n\n"

    @property
    def request_id(self) -> str | None:
        rid = self.body.get("error", {}).get("request_id")
        return rid if isinstance(rid, str) else None

    def with_request_id(self, request_id: str) -> ErrorReply:
        """The same error naming the request: ``error.request_id`` in the body (an extra member of OpenAI's
        error object, which clients ignore) and the ``x-request-id`` header."""
        error = {**self.body.get("error", {}), "request_id": request_id}
        return ErrorReply(self.status, {**self.body, "error": error},
                          {**self.headers, REQUEST_ID_HEADER: request_id})


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
_PARAM_RENAMES = {"max_output_tokens": "max_tokens", "user_id": "user", "cache_control": CACHE_HEADER,
                  "labels": "metadata"}
_LEADING_NAME = re.compile(r"([A-Za-z0-9_]*)(.*)", re.DOTALL)
BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
DEFAULT_UNAVAILABLE_RETRY_AFTER_S = 1.0


def openai_param(field_path: str) -> str:
    """A router field path as the OpenAI parameter: ``input.params.max_output_tokens`` -> ``max_tokens``,
    ``input.labels['k']`` -> ``metadata['k']``."""
    path = field_path.removeprefix("input.").removeprefix("params.")
    match = _LEADING_NAME.match(path)
    assert match is not None  # the pattern matches any string
    name, rest = match.groups()
    if name == "cache_control":
        return CACHE_HEADER
    return _PARAM_RENAMES.get(name, name) + rest


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
        if error.violations and error.reason != INVALID_JSON:
            reason = "invalid_value"
    elif status == 401:
        reason = "invalid_api_key"
    elif status == 429:
        reason = "insufficient_quota" if error.reason == BUDGET_EXHAUSTED else "rate_limit_exceeded"
    retry_after = getattr(error, "retry_after_s", None)
    if retry_after is None and status == 503:
        # Every 503 says when to come back (clients and proxies back off on it); the router's own hint when it
        # gave one, else a second: a killed part is restarted and probed again within about that.
        retry_after = DEFAULT_UNAVAILABLE_RETRY_AFTER_S
    if retry_after is not None and status in (429, 503):
        headers = retry_after_headers(retry_after)
    if status == 500:
        message, reason = "internal error in the gateway", "internal_error"
    return error_body(status, message, type_, param=param, code=reason, headers=headers)
