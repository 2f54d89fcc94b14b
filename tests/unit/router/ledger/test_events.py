"""The ledger writer's guard (values the columns cannot hold), refusal reasons without values, repaired
dead-letter events, and the dead-letter monitor: pure, no Redis or PostgreSQL."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import asyncpg
import pytest

from libs.errors import InvalidArgument
from services.router.ledger.dead_letters import DeadLetter, DeadLetterMonitor, event_problems, parse_repaired
from services.router.ledger.events import GUARD_LABEL, INT4, INT8, UsageEvent, guard_event
from services.router.ledger.writer import malformed_reason, refusal_reason
from tests.support.usage import usage_event

SECRET = "hunter2-label-value"


def _event(**changes: object) -> UsageEvent:
    return usage_event(**{"request_id": "r1", "cost_nano_usd": 100, "labels": {"team": "search"}, **changes})


def test_an_ordinary_event_passes_the_guard_unchanged() -> None:
    e = _event()
    assert guard_event(e) == (e, [])


def test_a_token_count_the_protos_allow_fits_the_ledger() -> None:
    # TokenUsage counts are uint32 (up to 2^32 - 1) and the ledger's token columns are integer (2^31 - 1):
    # a count the router accepts from an inference replica would be refused without the guard.
    guarded, changed = guard_event(_event(output_tokens=2**32 - 1))
    assert changed == ["output_tokens"] and guarded.output_tokens == INT4[1]
    assert guarded.cost_nano_usd == 100  # the bill itself is untouched


def test_numbers_are_clamped_to_their_column_and_the_change_is_labelled() -> None:
    guarded, changed = guard_event(_event(input_tokens=2**40, cached_input_tokens=-(2**35), cost_nano_usd=2**64,
                                          price_version=2**63))
    assert changed == ["cached_input_tokens", "cost_nano_usd", "input_tokens", "price_version"]
    assert (guarded.input_tokens, guarded.cached_input_tokens) == (INT4[1], INT4[0])
    assert (guarded.cost_nano_usd, guarded.price_version) == (INT8[1], INT8[1])
    assert guarded.labels == {"team": "search", GUARD_LABEL: ",".join(changed)}


def test_text_postgresql_cannot_store_is_replaced_but_the_request_id_is_not() -> None:
    guarded, changed = guard_event(_event(request_id="r\x001", variant="a\x00", error_reason="\ud800x",
                                          labels={"k": "v\x00"}))
    assert changed == ["error_reason", "labels", "variant"]
    assert guarded.variant == "a\ufffd" and guarded.error_reason == "?x" and guarded.labels["k"] == "v\ufffd"
    assert guarded.request_id == "r\x001"  # its identity: refused, visible in the dead letters, never altered


def test_a_naive_timestamp_is_taken_as_utc() -> None:
    naive = datetime(2026, 1, 1, 12, 0)
    guarded, changed = guard_event(_event(started_at=naive))
    assert changed == ["started_at"] and guarded.started_at == naive.replace(tzinfo=UTC)


@pytest.mark.parametrize(("exc", "expected"), [
    (asyncpg.DataError(f"invalid input for query argument $9: '{SECRET} (x)' ('str' object cannot be interpreted "
                       "as an integer)"),
     "DataError [22000] column input_tokens: '…' object cannot be interpreted as an integer"),
    (asyncpg.DataError("invalid input for query argument $10: 1099511627776 (value out of int32 range)"),
     "DataError [22000] column output_tokens: value out of int32 range"),
    (asyncpg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),
     "CharacterNotInRepertoireError [22021]: invalid byte sequence for encoding '…': 0x00"),
    (asyncpg.InvalidTextRepresentationError(f'invalid input syntax for type integer: "{SECRET}"\nDETAIL: {SECRET}'),
     "InvalidTextRepresentationError [22P02]: invalid input syntax for type integer: '…'"),
])
def test_a_refusal_reason_names_class_state_and_column_never_the_value(exc: BaseException, expected: str) -> None:
    reason = refusal_reason(exc)
    assert reason == expected
    assert SECRET not in reason


def test_a_malformed_reason_never_quotes_the_entry() -> None:
    with pytest.raises(ValueError) as bad_json:
        json.loads("{" + SECRET)
    assert malformed_reason(bad_json.value).startswith("malformed: not JSON")
    with pytest.raises(ValueError) as bad_time:
        datetime.fromisoformat(SECRET)
    assert malformed_reason(bad_time.value) == "malformed: ValueError"


def _letter(request_id: str = "r1") -> DeadLetter:
    return DeadLetter(id="1-0", request_id=request_id, reason="x", event_json="{}", source_id="0-1", dead_at=None,
                      attempts=1)


def test_a_repaired_event_must_be_typed_and_keep_its_request_id() -> None:
    good = _event(cost_nano_usd=5).to_json()
    assert parse_repaired(good, _letter(), "f").cost_nano_usd == 5
    for text, problem in [
        ("{", "not a usage event"),
        (json.dumps(json.loads(good) | {"input_tokens": "5"}), "input_tokens: wrong type"),
        (json.dumps(json.loads(good) | {"degraded": 1}), "degraded: wrong type"),
        (json.dumps(json.loads(good) | {"labels": {"a": 1}}), "labels: wrong type"),
        (json.dumps(json.loads(good) | {"request_id": "r2"}), "request_id must stay"),
        (json.dumps(json.loads(good) | {"unknown": 1}), "not a usage event"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            parse_repaired(text, _letter(), "repaired_event_json")
        assert any(problem in v.description for v in err.value.violations), (text, err.value.violations)
        assert all(v.field == "repaired_event_json" for v in err.value.violations)
    # An entry that was not even JSON has no request id to keep: any (non-empty) one will do.
    assert parse_repaired(good, _letter(""), "f").request_id == "r1"
    assert event_problems(_event(request_id="")) == ["request_id: required"]


class _Counts:
    def __init__(self, *counts: int):
        self._counts = list(counts)
        self.key = "tg:usage:dead"

    async def count(self) -> int:
        return self._counts.pop(0)


async def test_the_monitor_publishes_every_count_and_logs_changes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="services.router.ledger.dead_letters")
    published: list[int] = []

    async def publish(n: int) -> None:
        published.append(n)

    store = _Counts(0, 2, 2, 0)
    monitor = DeadLetterMonitor(store, publish, every_s=0)  # type: ignore[arg-type]
    for _ in range(4):
        await monitor.check_once()
    assert published == [0, 2, 2, 0]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["ledger dead letters: 2 in tg:usage:dead (tollgate dead-letters list / replay)"]
    assert any(r.getMessage() == "ledger dead letters: none left" for r in caplog.records)

