"""Proto enum values as the CLI shows and parses them, derived from the generated enum descriptors.

``KEY_ROLE_ADMIN`` of ``KeyRole`` is ``"admin"``, ``DEAD_LETTER_REPLAY_OUTCOME_ALREADY_IN_LEDGER`` of
``DeadLetterReplayOutcome`` is ``"already_in_ledger"``: the enum's prefix stripped, lower case. ops
writes no table of its own, so a value added to a proto shows up here without anyone listing it.
"""

from __future__ import annotations

import re
from typing import TypeVar, cast

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

E = TypeVar("E", bound=int)


def _prefix(enum: EnumTypeWrapper) -> str:
    """``KeyRole`` -> ``KEY_ROLE_`` (buf's ENUM_VALUE_PREFIX rule: every value starts with it)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"


def label(enum: EnumTypeWrapper, number: int) -> str:
    """``label(admin_pb2.KeyRole, KEY_ROLE_ADMIN)`` -> ``"admin"``; an unknown number -> ``"?"``."""
    try:
        name = enum.Name(number)
    except ValueError:
        return "?"
    return name.removeprefix(_prefix(enum)).lower()


def value(enum: type[E], text: str) -> E:
    """The inverse of ``label``: ``value(admin_pb2.KeyRole, "admin")`` -> ``KEY_ROLE_ADMIN``; ValueError if none."""
    wrapper = cast(EnumTypeWrapper, enum)
    return cast(E, wrapper.Value(_prefix(wrapper) + text.upper()))


def labels(enum: EnumTypeWrapper) -> list[str]:
    """Every label but the zero value's (UNSPECIFIED), in declaration order."""
    return [label(enum, number) for _, number in enum.items() if number != 0]
