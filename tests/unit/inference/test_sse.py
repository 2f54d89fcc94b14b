from __future__ import annotations

import json
import random

import pytest

from services.inference.sse import SSEDecoder, SSEEvent, SSEProtocolError

# An OpenAI-style stream with everything a parser trips on: a comment/keepalive, multi-byte
# UTF-8 (2, 3 and 4 bytes), CRLF and bare-CR line ends, a multi-line data field, named events.
STREAM = (
    ": keepalive\n\n"
    + "data: " + json.dumps({"choices": [{"delta": {"content": "héllo wörld"}}]}, ensure_ascii=False) + "\n\n"
    + "data: " + json.dumps({"choices": [{"delta": {"content": " 日本語 🎉"}}]}, ensure_ascii=False) + "\r\n\r\n"
    + "event: message_delta\r"
    + "data: first line\r"
    + "data: second line\r\r"
    + "id: 42\n"
    + "retry: 1500\n"
    + "data:no-space\n\n"
    + ": ping\n"
    + "data: [DONE]\n\n"
).encode()

EXPECTED = [
    SSEEvent(data=json.dumps({"choices": [{"delta": {"content": "héllo wörld"}}]}, ensure_ascii=False)),
    SSEEvent(data=json.dumps({"choices": [{"delta": {"content": " 日本語 🎉"}}]}, ensure_ascii=False)),
    SSEEvent(data="first line\nsecond line", event="message_delta"),
    SSEEvent(data="no-space", id="42", retry_ms=1500),
    SSEEvent(data="[DONE]", id="42", retry_ms=1500),
]


def decode(pieces: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for piece in pieces:
        events += decoder.feed(piece)
    events += decoder.close()
    return events


def test_whole_stream() -> None:
    assert decode([STREAM]) == EXPECTED


def test_byte_by_byte() -> None:
    assert decode([STREAM[i:i + 1] for i in range(len(STREAM))]) == EXPECTED


def test_every_two_way_split() -> None:
    # Includes splits inside each multi-byte character, inside "data:", and between "\r" and "\n".
    for i in range(len(STREAM) + 1):
        assert decode([STREAM[:i], STREAM[i:]]) == EXPECTED, f"split at byte {i}"


def test_random_splits() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 40)))
        pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)], strict=True)]
        assert decode(pieces) == EXPECTED


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    # "data: a\r" | "\ndata: b\r\n\r\n" must be ONE event "a\nb", not two.
    assert decode([b"data: a\r", b"\ndata: b\r\n\r\n"]) == [SSEEvent(data="a\nb")]


def test_events_are_emitted_as_soon_as_complete() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: tw") == [SSEEvent(data="one")]
    assert decoder.feed(b"o\n\n") == [SSEEvent(data="two")]


def test_bom_comments_and_empty_events() -> None:
    data = "\ufeff: comment only\n\nevent: noop\n\ndata:\n\n".encode()
    # A block with no data lines dispatches nothing; "data:" alone is an event with empty data.
    assert decode([data]) == [SSEEvent(data="")]


def test_unterminated_final_event_is_flushed_at_close() -> None:
    assert decode([b"data: [DONE]"]) == [SSEEvent(data="[DONE]")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode([b"data: \xff\xfe ok\n\n"]) == [SSEEvent(data="\ufffd\ufffd ok")]


def test_runaway_line_is_a_protocol_error() -> None:
    decoder = SSEDecoder(max_line_chars=100)
    with pytest.raises(SSEProtocolError):
        decoder.feed(b"data: " + b"x" * 200)
