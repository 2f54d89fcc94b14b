"""libs.chat.validate_messages / validate_params (shared by router, cache and inference) and libs.validation."""

from __future__ import annotations

from tollgate.common.v1 import common_pb2

from libs.chat import MAX_MESSAGES, validate_messages, validate_params
from libs.errors import Violations
from libs.validation import check_token

USER = common_pb2.MESSAGE_ROLE_USER


def fields(v: Violations) -> set[str]:
    return {item.field for item in v.items}


def test_messages_refuse_nul_content_and_bad_names() -> None:
    v = Violations()
    validate_messages([common_pb2.ChatMessage(role=USER, content="a\x00", name="n" * 65),
                       common_pb2.ChatMessage(role=USER, content="tab\tand\x1bescape are fine", name="bob\n")], v)
    assert fields(v) == {"messages[0].content", "messages[0].name", "messages[1].name"}


def test_too_many_messages_is_one_violation_not_one_per_message() -> None:
    v = Violations()
    validate_messages([common_pb2.ChatMessage(role=USER, content="\x00")] * (MAX_MESSAGES + 1), v)
    assert [i.field for i in v.items] == ["messages"]


def test_params_must_be_finite_and_stops_bounded() -> None:
    v = Violations()
    validate_params(common_pb2.GenerationParams(temperature=float("nan"), top_p=float("-inf"),
                                                stop=["", "x" * 129, "ok\n"]), v)
    assert fields(v) == {"params.temperature", "params.top_p", "params.stop[0]", "params.stop[1]"}
    v = Violations()
    validate_params(common_pb2.GenerationParams(stop=["s"] * 9), v)
    assert fields(v) == {"params.stop"}


def test_check_token_allows_only_header_safe_ascii() -> None:
    for bad in ["é", "\x80", "a b", "a\r\nb", "x" * 129]:
        v = Violations()
        check_token(v, bad, "id", max_chars=128)
        assert fields(v) == {"id"}, bad
    v = Violations()
    check_token(v, "req-1.a_b:C9", "id", max_chars=128)
    check_token(v, "", "id")
    assert not v.items

