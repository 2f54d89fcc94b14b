"""OpenAI JSON <-> RouterService protobufs, and the error table (services/edge/openai_format.py)."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest
from google.protobuf import duration_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import router_pb2

from libs import chat, validation
from libs.chat import validate_messages
from libs.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    QuotaViolation,
    TollgateError,
    Unauthenticated,
    Unavailable,
)
from services.edge import openai_format as fmt


def _body(**fields: Any) -> bytes:
    data: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return json.dumps(data).encode()


def _bad_param(body: bytes, **kwargs: Any) -> str | None:
    with pytest.raises(InvalidArgument) as info:
        fmt.chat_request(body, **kwargs)
    reply = fmt.error_reply(info.value)
    assert reply.status == 400 and reply.body["error"]["type"] == "invalid_request_error"
    param: str | None = reply.body["error"]["param"]
    return param


# --- request ----------------------------------------------------------------------

def test_full_request_maps_every_field() -> None:
    call = fmt.chat_request(_body(
        messages=[{"role": "system", "content": "be brief"}, {"role": "developer", "content": "really"},
                  {"role": "user", "content": "hi", "name": "ann"},
                  {"role": "assistant", "content": None}, {"role": "tool", "content": "42"}],
        temperature=0, top_p=0.5, max_tokens=64, stop="END", seed=7, stream=True,
        stream_options={"include_usage": True}, user="u-1", fallback_models=["a", "b"]))
    inp = call.input
    assert call.stream and call.include_usage
    assert inp.model == "m" and list(inp.fallback_models) == ["a", "b"] and inp.user_id == "u-1"
    assert [m.role for m in inp.messages] == [
        common_pb2.MESSAGE_ROLE_SYSTEM, common_pb2.MESSAGE_ROLE_SYSTEM, common_pb2.MESSAGE_ROLE_USER,
        common_pb2.MESSAGE_ROLE_ASSISTANT, common_pb2.MESSAGE_ROLE_TOOL]
    assert inp.messages[2].name == "ann" and inp.messages[3].content == ""
    p = inp.params
    assert p.HasField("temperature") and p.temperature == 0.0
    assert p.top_p == pytest.approx(0.5) and p.max_output_tokens == 64 and list(p.stop) == ["END"]
    assert p.seed == 7
    assert not inp.HasField("cache_control")


def test_defaults_leave_optional_params_unset() -> None:
    call = fmt.chat_request(_body())
    p = call.input.params
    assert not call.stream and not call.include_usage
    assert not p.HasField("temperature") and not p.HasField("top_p") and not p.HasField("seed")
    assert p.max_output_tokens == 0 and list(p.stop) == []


def test_stop_list_and_max_completion_tokens_wins() -> None:
    p = fmt.chat_request(_body(stop=["a", "", "b"], max_tokens=10, max_completion_tokens=20)).input.params
    assert list(p.stop) == ["a", "b"] and p.max_output_tokens == 20


def test_text_content_parts_are_joined() -> None:
    inp = fmt.chat_request(_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}])).input
    assert inp.messages[0].content == "one\ntwo"


@pytest.mark.parametrize(("cache", "no_cache", "no_store"), [
    ("no-cache", True, False), ("no-store", False, True), ("No-Cache, no-store", True, True),
    (["no-store"], False, True), ("", False, False)])
def test_cache_control_from_header_or_body(cache: Any, no_cache: bool, no_store: bool) -> None:
    if isinstance(cache, str):
        cc = fmt.chat_request(_body(), cache_header=cache).input.cache_control
        assert (cc.no_cache, cc.no_store) == (no_cache, no_store)
    cc = fmt.chat_request(_body(tollgate_cache=cache)).input.cache_control
    assert (cc.no_cache, cc.no_store) == (no_cache, no_store)


@pytest.mark.parametrize(("fields", "param"), [
    ({"model": 3}, "model"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": [1]}, "top_p"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
    ({"stop": 3}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "y"}}, "stream_options"),
    ({"user": 1}, "user"),
    ({"fallback_models": "a"}, "fallback_models"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tollgate_cache": "no-thanks"}, "tollgate_cache"),
])
def test_wrong_types_are_400_naming_the_param(fields: dict[str, Any], param: str) -> None:
    assert _bad_param(_body(**fields)) == param


def test_bad_cache_header_is_400() -> None:
    assert _bad_param(_body(), cache_header="sometimes") == "x-tollgate-cache"


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b"null"])
def test_malformed_body_is_400_without_param(body: bytes) -> None:
    with pytest.raises(InvalidArgument) as info:
        fmt.chat_request(body)
    reply = fmt.error_reply(info.value)
    assert reply.status == 400
    assert reply.body["error"]["param"] is None and reply.body["error"]["code"] == "invalid_json"


def test_request_timeout() -> None:
    assert fmt.request_timeout(None, default_s=60, max_s=600) == 60
    assert fmt.request_timeout(None, default_s=60, max_s=30) == 30
    assert fmt.request_timeout("2.5", default_s=60, max_s=600) == 2.5
    assert fmt.request_timeout("9999", default_s=60, max_s=600) == 600
    for bad in ("soon", "0", "-1", "nan", "inf"):
        with pytest.raises(InvalidArgument):
            fmt.request_timeout(bad, default_s=60, max_s=600)


# --- responses --------------------------------------------------------------------

def _summary(**overrides: Any) -> router_pb2.GenerationSummary:
    fields: dict[str, Any] = dict(
        request_id="r1", model="small", provider="openai",
        usage=common_pb2.TokenUsage(input_tokens=10, output_tokens=5, cached_input_tokens=4),
        cost_nano_usd=123, saved_nano_usd=0, cache_tier=common_pb2.CACHE_TIER_MISS, degraded=True,
        degraded_reasons=[router_pb2.DEGRADED_REASON_RATELIMIT_UNAVAILABLE],
        finish_reason=common_pb2.FINISH_REASON_LENGTH, latency=duration_pb2.Duration(nanos=1000),
        degradation_level=router_pb2.DEGRADATION_LEVEL_FULL, route_reason="requested", attempts=1,
        price_version=3)
    fields.update(overrides)
    return router_pb2.GenerationSummary(**fields)


def test_completion_object() -> None:
    out = fmt.completion(router_pb2.GenerateResponse(content="Hello", summary=_summary()), created=1700)
    assert out["id"] == "chatcmpl-r1" and out["object"] == "chat.completion" and out["created"] == 1700
    assert out["model"] == "small"
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                               "finish_reason": "length"}]
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
                            "prompt_tokens_details": {"cached_tokens": 4}}
    t = out["tollgate"]
    assert t["request_id"] == "r1" and t["cost_nano_usd"] == 123 and t["cache_tier"] == "miss"
    assert t["degraded"] is True and t["degraded_reasons"] == ["ratelimit_unavailable"]
    assert t["degradation_level"] == "full" and t["route_reason"] == "requested" and t["attempts"] == 1
    json.loads(fmt.dumps(out))  # serialisable


@pytest.mark.parametrize(("value", "name"), [
    (common_pb2.FINISH_REASON_STOP, "stop"), (common_pb2.FINISH_REASON_LENGTH, "length"),
    (common_pb2.FINISH_REASON_CONTENT_FILTER, "content_filter"), (common_pb2.FINISH_REASON_UNSPECIFIED, "stop"),
    (common_pb2.FINISH_REASON_CANCELLED, "cancelled")])
def test_finish_reasons(value: int, name: str) -> None:
    assert fmt.finish_reason(value) == name


def _frames(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    out: list[Any] = []
    for frame in data.split(b"\n\n")[:-1]:
        assert frame.startswith(b"data: ")
        payload = frame[len(b"data: "):]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def test_stream_chunks() -> None:
    enc = fmt.ChunkEncoder("chatcmpl-x", "auto", 1700)
    first, second = _frames(enc.delta("Hel"))[0], _frames(enc.delta('lo "\u00e9"\n'))[0]
    assert first == {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1700, "model": "auto",
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "logprobs": None,
                                  "finish_reason": None}]}
    assert second["choices"][0]["delta"] == {"content": 'lo "\u00e9"\n'}
    finish, usage_chunk, done = _frames(enc.finish(_summary(), include_usage=True))
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert finish["model"] == "small" and finish["tollgate"]["request_id"] == "r1"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] == 15
    assert done == "[DONE]"


def test_stream_without_deltas_still_sends_the_role_and_no_usage_unless_asked() -> None:
    enc = fmt.ChunkEncoder("chatcmpl-x", "m", 1)
    role, finish, done = _frames(enc.finish(_summary(), include_usage=False))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert finish["choices"][0]["finish_reason"] == "length" and done == "[DONE]"


def test_models_list() -> None:
    resp = router_pb2.ListAvailableModelsResponse(models=[
        router_pb2.AvailableModel(name="auto", provider="tollgate"),
        router_pb2.AvailableModel(name="small", provider="openai", context_window=8192, cost_tier="cheap")])
    assert fmt.models_list(resp) == {"object": "list", "data": [
        {"id": "auto", "object": "model", "created": 0, "owned_by": "tollgate"},
        {"id": "small", "object": "model", "created": 0, "owned_by": "openai"}]}


# --- errors -----------------------------------------------------------------------

def _budget() -> QuotaExceeded:
    e = QuotaExceeded("budget exhausted: daily", [QuotaViolation("key:k", "daily budget")], 3600.2)
    e.reason = "BUDGET_EXHAUSTED"
    return e


@pytest.mark.parametrize(("error", "code", "status", "type_", "err_code", "retry_after"), [
    (Unauthenticated("unknown key"), "UNAUTHENTICATED", 401, "authentication_error", "invalid_api_key", None),
    (PermissionDenied("no"), "PERMISSION_DENIED", 403, "permission_error", "permission_denied", None),
    (NotFound("gone"), "NOT_FOUND", 404, "invalid_request_error", "not_found", None),
    (QuotaExceeded("rpm", [QuotaViolation("key:k", "requests_per_minute limit 1 exceeded")], 0.2),
     "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rate_limit_exceeded", "1"),
    (_budget(), "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "insufficient_quota", "3601"),
    (Overloaded("shedding", 2.0), "RESOURCE_EXHAUSTED", 429, "rate_limit_error", "rate_limit_exceeded", "2"),
    (Unavailable("no backend", reason="NO_BACKEND", retry_after_s=1.5), "UNAVAILABLE", 503, "server_error",
     "no_backend", "2"),
    # Every 503 says when to come back: a second when the router gave no hint.
    (Unavailable("router down"), "UNAVAILABLE", 503, "server_error", "unavailable", "1"),
    (DeadlineExceeded("late"), "DEADLINE_EXCEEDED", 504, "server_error", "deadline_exceeded", None),
    (Unavailable("boom", reason="INTERNAL_ERROR"), "INTERNAL", 500, "server_error", "internal_error", None),
    (Unavailable("huh"), "UNKNOWN", 500, "server_error", "internal_error", None),
])
def test_error_table(error: TollgateError, code: str, status: int, type_: str, err_code: str,
                     retry_after: str | None) -> None:
    reply = fmt.error_reply(error, code)
    assert reply.status == status
    body = reply.body["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == type_ and body["code"] == err_code
    assert reply.headers.get("retry-after") == retry_after
    if status == 500:
        assert body["message"] == "internal error in the gateway"  # nothing of the router's internals
    # The same error raised at the edge (no gRPC code) maps the same way, except the catch-all 500s.
    if status != 500:
        assert fmt.error_reply(error).status == status


def test_invalid_argument_from_the_router_names_openai_params() -> None:
    error = InvalidArgument([FieldViolation("input.params.max_output_tokens", "must be at most 32768"),
                             FieldViolation("input.params.temperature", "must be between 0 and 2"),
                             FieldViolation("input.messages[2].role", "bad")])
    reply = fmt.error_reply(error, "INVALID_ARGUMENT")
    body = reply.body["error"]
    assert reply.status == 400 and body["param"] == "max_tokens" and body["code"] == "invalid_value"
    assert body["message"] == ("max_tokens: must be at most 32768; temperature: must be between 0 and 2; "
                               "messages[2].role: bad")


@pytest.mark.parametrize(("field", "param"), [
    ("input.model", "model"), ("input.user_id", "user"), ("input.fallback_models", "fallback_models"),
    ("input.params.stop", "stop"), ("input.cache_control.max_age_seconds", "x-tollgate-cache"),
    ("messages[0].content[1].type", "messages[0].content[1].type")])
def test_openai_param(field: str, param: str) -> None:
    assert fmt.openai_param(field) == param


@pytest.mark.parametrize(("seconds", "header", "ms"), [
    (0.0, "1", "1"), (0.001, "1", "1"), (0.2, "1", "200"), (1.0, "1", "1000"), (1.0000000001, "1", "1000"),
    (1.001, "2", "1001"), (59.5, "60", "59500")])
def test_retry_after_rounds_up_to_whole_seconds(seconds: float, header: str, ms: str) -> None:
    assert fmt.retry_after_headers(seconds) == {"retry-after": header, "retry-after-ms": ms}


def test_error_as_sse_event() -> None:
    reply = fmt.error_reply(Unavailable("gone", reason="BACKEND_ERROR"), "UNAVAILABLE")
    [event] = _frames(reply.sse())
    assert event["error"]["type"] == "server_error" and event["error"]["code"] == "backend_error"


# --- strict JSON and the router's limits (issue 14) ---------------------------------

_MSG = b'"model":"m","messages":[{"role":"user","content":"x"}]'


def _refused(body: bytes) -> dict[str, Any]:
    """The OpenAI error body for a refused request (it must be InvalidArgument -> 400, nothing else)."""
    with pytest.raises(InvalidArgument) as info:
        fmt.chat_request(body)
    reply = fmt.error_reply(info.value)
    assert reply.status == 400
    error: dict[str, Any] = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def test_a_lone_surrogate_is_400_naming_the_field() -> None:
    # Before: UnicodeEncodeError building the protobuf -> 500.
    error = _refused(b'{"model":"m","messages":[{"role":"user","content":"a\\ud800b"}]}')
    assert error["param"] == "messages[0].content" and error["code"] == "invalid_json"
    assert _refused(b'{' + _MSG + b',"ignored":{"\\udfff":1}}')["param"] == "ignored"  # in a key, too


def test_a_surrogate_pair_is_one_character() -> None:
    inp = fmt.chat_request(b'{"model":"m","messages":[{"role":"user","content":"\\ud83d\\ude00"}]}').input
    assert inp.messages[0].content == "\U0001f600"


def test_1e309_is_400() -> None:
    error = _refused(b'{' + _MSG + b',"temperature":1e309}')  # before: inf was sent on to the router
    assert error["param"] == "temperature" and "1e309" in error["message"]


def test_minus_1e309_is_400() -> None:
    assert _refused(b'{' + _MSG + b',"top_p":-1e309}')["param"] == "top_p"


def test_nan_is_400() -> None:
    assert _refused(b'{' + _MSG + b',"temperature":NaN}')["param"] == "temperature"


@pytest.mark.parametrize("token", [b"Infinity", b"-Infinity"])
def test_infinity_is_400(token: bytes) -> None:
    assert _refused(b'{' + _MSG + b',"x":{"y":[1,' + token + b']}}')["param"] == "x.y[1]"


def test_an_integer_too_big_for_a_double_is_400() -> None:
    # Before: OverflowError converting 10**400 to the protobuf float -> 500.
    assert _refused(b'{' + _MSG + b',"temperature":1' + b"0" * 400 + b'}')["param"] == "temperature"
    assert _refused(b'{' + _MSG + b',"max_tokens":1' + b"0" * 400 + b'}')["param"] == "max_tokens"
    assert _refused(b'{' + _MSG + b',"seed":1' + b"0" * 5000 + b'}')["code"] == "invalid_json"  # past 4300 digits


@pytest.mark.parametrize("depth", [fmt.MAX_JSON_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_400(depth: int) -> None:
    # Before: RecursionError from the standard library's parser (100,000 levels) -> 500.
    error = _refused(b'{' + _MSG + b',"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}")
    assert error["code"] == "invalid_json" and error["param"] is None and "levels deep" in error["message"]


def test_nesting_up_to_the_limit_is_fine() -> None:
    depth = fmt.MAX_JSON_DEPTH - 1  # the body object is the first level
    fmt.chat_request(b'{' + _MSG + b',"x":' + b"[" * depth + b"]" * depth + b"}")


@pytest.mark.parametrize("body", [b"\xc3\x28", b'{"model":"\xed\xa0\x80"}', b"\xef\xbb\xbf\xef\xbb\xbf{}",
                                  '{"model":"m"}'.encode("utf-16")])
def test_not_utf8_json_is_400(body: bytes) -> None:
    assert _refused(body)["code"] == "invalid_json"


def test_one_leading_utf8_byte_order_mark_is_ignored() -> None:
    # RFC 8259 lets a parser ignore it, and some Windows tools write one; the edge accepted it before.
    fmt.chat_request(b"\xef\xbb\xbf{" + _MSG + b"}")


def test_an_error_message_does_not_quote_a_huge_value() -> None:
    error = _refused(_body(messages=[{"role": "user", "content": [{"type": "x" * 100_000}]}]))
    assert len(error["message"]) < 200


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": [{"role": "user", "content": "x"}] * (fmt.MAX_MESSAGES + 1)}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 600_000}, {"role": "user", "content": [
        {"type": "text", "text": "y" * 399_999}, {"type": "text", "text": "z"}]}]}, "messages"),
    ({"stop": ["s"] * (fmt.MAX_STOP + 1)}, "stop"),
    ({"fallback_models": ["a"] * (fmt.MAX_FALLBACK_MODELS + 1)}, "fallback_models"),
    ({"fallback_models": ["a", 1]}, "fallback_models[1]"),
    ({"fallback_models": ["a\x00"]}, "fallback_models[0]"),
    ({"user": "u" * (fmt.MAX_USER_CHARS + 1)}, "user"),
    ({"user": "a\x00b"}, "user"),
    ({"user": "a\nb"}, "user"),
    ({"model": "m" * (fmt.MAX_MODEL_NAME_CHARS + 1)}, "model"),
    ({"fallback_models": ["m" * (fmt.MAX_MODEL_NAME_CHARS + 1)]}, "fallback_models[0]"),
    ({"fallback_models": [""]}, "fallback_models[0]"),
    ({"stop": "s" * (fmt.MAX_STOP_CHARS + 1)}, "stop"),
    ({"stop": ["ok", "s\x00"]}, "stop[1]"),
    ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content"),
    ({"model": "m\x1b[31m"}, "model"),
    ({"messages": [{"role": "user", "content": "x", "name": "n" * (fmt.MAX_MESSAGE_NAME_CHARS + 1)}]},
     "messages[0].name"),
    ({"messages": [{"role": "user", "content": "x", "name": "a\x00"}]}, "messages[0].name"),
    ({"metadata": "k=v"}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(fmt.LIMITS["metadata_entries"] + 1)}}, "metadata"),
    ({"metadata": {"k" * (fmt.LIMITS["metadata_key_chars"] + 1): "v"}}, "metadata['" + "k" * 64 + "']"),
    ({"metadata": {"k": "v" * (fmt.LIMITS["metadata_value_chars"] + 1)}}, "metadata['k']"),
    ({"metadata": {"k": "a\x00b"}}, "metadata['k']"),
    ({"metadata": {"": "v"}}, "metadata"),
    ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, "y"]}]}, "messages[0].content[1]"),
    ({"stream_options": [True]}, "stream_options"),
    ({"tollgate_cache": 5}, "tollgate_cache"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 1.0}, "n"),
    ({"n": True}, "n"),
    ({"top_p": 10**400}, "top_p"),
])
def test_the_routers_limits_are_refused_at_the_edge_naming_the_param(fields: dict[str, Any], param: str) -> None:
    assert _bad_param(_body(**fields)) == param


def test_requests_at_the_limits_pass() -> None:
    content = "x" * (fmt.MAX_MESSAGE_CHARS // fmt.MAX_MESSAGES)
    inp = fmt.chat_request(_body(
        model="m" * fmt.MAX_MODEL_NAME_CHARS,
        fallback_models=["f" * fmt.MAX_MODEL_NAME_CHARS] * fmt.MAX_FALLBACK_MODELS,
        messages=[{"role": "user", "content": content, "name": "n" * fmt.MAX_MESSAGE_NAME_CHARS}] * fmt.MAX_MESSAGES,
        stop=["s\n" * (fmt.MAX_STOP_CHARS // 2)] * fmt.MAX_STOP, user="u" * fmt.MAX_USER_CHARS, n=1,
        metadata={f"k{i}": "v" * 256 for i in range(32)})).input
    assert len(inp.messages) == 256 and len(inp.labels) == 32 and inp.labels["k0"] == "v" * 256
    assert inp.messages[0].content == content and len(inp.params.stop) == 8 and len(inp.fallback_models) == 4


def test_metadata_becomes_labels_and_router_label_violations_name_metadata() -> None:
    assert dict(fmt.chat_request(_body(metadata={"team": "search"})).input.labels) == {"team": "search"}
    reply = fmt.error_reply(InvalidArgument([FieldViolation("input.labels['k']", "too long")]), "INVALID_ARGUMENT")
    assert reply.body["error"]["param"] == "metadata['k']"


@pytest.mark.parametrize(("content_type", "encoding", "ok"), [
    (None, None, True), ("application/json", None, True), ("application/json; charset=utf-8", None, True),
    ('Application/JSON; charset="UTF-8"', "identity", True), ("text/plain", None, True),
    ("application/x-www-form-urlencoded", None, True), ("application/json; charset=latin-1", None, False),
    ("multipart/form-data; boundary=x", None, False),
    ("", None, False), ("application/json", "gzip", False), (None, "br", False)])
def test_unsupported_media_is_415(content_type: str | None, encoding: str | None, ok: bool) -> None:
    reply = fmt.unsupported_media(content_type, encoding)
    if ok:
        assert reply is None
    else:
        assert reply is not None and reply.status == 415
        assert reply.body["error"]["code"] == "unsupported_media_type"


def test_a_problem_after_a_deep_subtree_is_found_without_recursing_into_it() -> None:
    deep = b"[" * 900 + b"]" * 900  # within the parser's recursion limit, past MAX_JSON_DEPTH
    error = _refused(b'{' + _MSG + b',"deep":' + deep + b',"late":"\\ud800"}')
    assert error["param"] in ("late", None)


def test_the_limits_are_the_shared_validators_defaults() -> None:
    # The router calls these with their defaults; tests/fuzz/test_fuzz_edge.py checks the running router too.
    messages = inspect.signature(validate_messages).parameters
    assert messages["max_messages"].default == fmt.MAX_MESSAGES
    assert messages["max_chars"].default == fmt.MAX_MESSAGE_CHARS
    assert fmt.LIMITS["metadata_entries"] == validation.MAX_LABELS
    assert fmt.MAX_STOP == chat.MAX_STOP_SEQUENCES and fmt.MAX_STOP_CHARS == chat.MAX_STOP_CHARS
    assert fmt.MAX_MESSAGE_NAME_CHARS == chat.MAX_MESSAGE_NAME_CHARS
