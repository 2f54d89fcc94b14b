"""Hypothesis strategies for any protobuf message, built from its descriptor (no hand-listed fields).

Written here because no maintained library does it (``hypothesis-protobuf`` was last released in 2015
and predates proto3). Every field of every message is reachable: scalars with their full ranges and
the boundary values that break code (0, -1, the type's extremes, NaN and infinities), strings with
NUL, control characters and oversized lengths, enums with known and unknown numbers, nested messages
to a bounded depth, repeated and map fields, oneofs, and the well-known types with out-of-range
values (a Timestamp in year 9999+ or before year 1).

Usage::

    @given(request=message_strategy(cache_pb2.LookupRequest.DESCRIPTOR))
    def test_x(request): ...
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 4
MAX_REPEATED = 6
# An oversized repeated field (300 entries) repeats one value only when the copies stay under this.
MAX_OVERSIZED_REPEATED_BYTES = 2 * 1024 * 1024

_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT32 = (0, 2**32 - 1)
_UINT64 = (0, 2**64 - 1)

_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: _INT32, FieldDescriptor.TYPE_SINT32: _INT32, FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT64, FieldDescriptor.TYPE_SINT64: _INT64, FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT32: _UINT32, FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64, FieldDescriptor.TYPE_FIXED64: _UINT64,
}

# Characters that break storage, logs and parsers: NUL, other C0 controls, DEL, BOM, RTL override, and
# characters outside the BMP. Surrogates are left out: protobuf strings are UTF-8 and cannot hold them.
_NASTY_CHARS = "\x00\x01\x07\x08\x0b\x1b\x1f\x7f\ufeff\u202e\U0001f600'\"\\%_{}\n\r\t"


def _integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({v for v in (lo, hi, 0, 1, -1, lo + 1, hi - 1, 2**31 - 1, 2**31, 2**53 + 1) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -1000), min(hi, 1000)))


def _floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308,
                                      5e-324, 2.0000001, 1e9]),
                     st.floats(width=width, allow_nan=True, allow_infinity=True))


# Strategies are built once per descriptor/field and reused: building them at every draw made
# generation (hypothesis analyses each new strategy) cost more than the RPC under test.
@functools.cache
def text_strategy() -> st.SearchStrategy[str]:
    """Short and long strings, with the characters that break storage and parsers mixed in."""
    short = st.text(st.one_of(st.characters(codec="utf-8"), st.sampled_from(_NASTY_CHARS)), max_size=40)
    long = st.builds(lambda c, n: c * n, st.sampled_from(["a", "\x00", "é", "\U0001f600", "ab "]),
                     st.sampled_from([257, 1_025, 4_097, 70_000, 1_100_000]))
    return st.one_of(st.just(""), short, short, short, long)


def _bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=64), st.builds(lambda n: b"\x00" * n, st.sampled_from([1_025, 70_000])))


def _enum(enum: EnumDescriptor) -> st.SearchStrategy[int]:
    known = [v.number for v in enum.values]
    # proto3 enums are open: a caller may send a number the server's build does not know.
    return st.one_of(st.sampled_from(known), st.sampled_from([max(known) + 1, -1, 2**31 - 1]))


def _timestamp_like(cls: type[Message]) -> st.SearchStrategy[Message]:
    # Beyond what datetime and PostgreSQL can hold, and nanos outside [0, 1e9).
    seconds = st.one_of(st.integers(-62_135_596_800 - 10, 253_402_300_799 + 10), st.sampled_from(
        [0, -1, 2**31, -(2**31), 2**62, -(2**62), 253_402_300_800, -62_135_596_801, 32_503_680_000]))
    nanos = st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 1_000_000_000, 2**31 - 1, -(2**31)]))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds, nanos)


@functools.cache
def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _RANGES:
        return _integers(*_RANGES[t])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _floats(64)
    if t == FieldDescriptor.TYPE_FLOAT:
        return _floats(32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return text_strategy()
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes()
    if t == FieldDescriptor.TYPE_ENUM:
        return _enum(field.enum_type)
    raise TypeError(f"unsupported field type {t} ({field.full_name})")


def _class_of(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    return _scalar(field)


def _is_repeated(field: FieldDescriptor) -> bool:
    # ``label`` is deprecated in newer protobuf releases; ``is_repeated`` is not in older ones.
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


@functools.cache
def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of ``descriptor``'s type; fields are set sparsely so each draw stresses a few of them."""
    cls = _class_of(descriptor)
    if descriptor.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return _timestamp_like(cls)
    if depth >= MAX_DEPTH:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        oneof_fields = {f.name for o in descriptor.oneofs for f in o.fields}
        for oneof in descriptor.oneofs:
            choice = draw(st.sampled_from([None, *oneof.fields]))
            if choice is not None:
                _set(msg, choice, draw, depth)
        for field in descriptor.fields:
            if field.name in oneof_fields or not draw(st.booleans()):
                continue
            _set(msg, field, draw, depth)
        return msg

    return build()


def _approx_bytes(value: Any) -> int:
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str | bytes):
        return len(value)
    return 8


def _set(msg: Message, field: FieldDescriptor, draw: st.DrawFn, depth: int) -> None:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(_value(key_field, depth), _value(value_field, depth), max_size=MAX_REPEATED)
                       if draw(st.integers(0, 9)) else
                       st.dictionaries(st.text(max_size=8), st.just("v"), min_size=33, max_size=40))
        target = getattr(msg, field.name)
        for k, v in entries.items():
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
        return
    if _is_repeated(field):
        size = draw(st.one_of(st.integers(0, MAX_REPEATED), st.sampled_from([0, 1, 300])))
        items = draw(st.lists(_value(field, depth), min_size=min(size, MAX_REPEATED), max_size=min(size, 8)))
        # Many copies of one value: cheap to build, still oversized; but only of a small value, else one
        # draw becomes a gigabyte (300 copies of a megabyte string) and the test measures serialization.
        if size > MAX_REPEATED and items and _approx_bytes(items[0]) * size <= MAX_OVERSIZED_REPEATED_BYTES:
            items = items[:1] * size
        target = getattr(msg, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in items:
                target.add().CopyFrom(item)
        else:
            target.extend(items)
        return
    value = draw(_value(field, depth))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def one_field_mutated(base: Message) -> st.SearchStrategy[Message]:
    """``base`` with exactly one field (at any depth: a nested message's field, one element of a repeated
    message field) replaced by a value of ``message_strategy``'s kind. From a valid request this mostly
    gives requests that are still valid but differ, so a fuzzer reaches the code behind validation."""

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        out = type(base)()
        out.CopyFrom(base)
        target: Message = out
        depth = 0
        while True:
            fields: list[FieldDescriptor] = list(target.DESCRIPTOR.fields)
            if not fields:  # an empty message type: nothing to change
                return out
            field = draw(st.sampled_from(fields))
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            if field.message_type is not None and not is_map and depth + 1 < MAX_DEPTH:
                if _is_repeated(field):
                    items = getattr(target, field.name)
                    if len(items) and draw(st.booleans()):
                        target, depth = items[draw(st.integers(0, len(items) - 1))], depth + 1
                        continue
                elif target.HasField(field.name) and draw(st.booleans()):
                    target, depth = getattr(target, field.name), depth + 1
                    continue
            target.ClearField(field.name)
            _set(target, field, draw, depth)
            return out

    return build()
