"""Input limits and text checks every service's request validation shares.

Why these checks exist: a string that PostgreSQL cannot store (a NUL byte; JSONB refuses ``\\u0000``
too) or that a log line or HTTP header should never carry (other control characters) must be refused
when the request arrives, as ``INVALID_ARGUMENT`` naming the field, not discovered later when the
ledger row is refused and lands in a dead-letter stream. The limits are documented in each proto's
comments and in ``docs/architecture.md``; a service passes its own numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from libs.errors import Violations

# C0 controls and DEL, but not tab, newline and carriage return (ordinary in free text).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Every C0 control and DEL: for identifiers, labels and names (one line, no tabs).
_CONTROL_OR_WHITESPACE_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What an id that travels in HTTP headers and log fields may hold: ASCII only (a header cannot carry the rest).
_TOKEN = re.compile(r"[A-Za-z0-9._:\-]+")

# Defaults for what is not free text (ids, names, label keys and values).
MAX_ID_CHARS = 256
MAX_LABELS = 32
MAX_LABEL_KEY_CHARS = 64
MAX_LABEL_VALUE_CHARS = 256


def check_name(v: Violations, value: str, field_path: str, *, max_chars: int = MAX_ID_CHARS,
               required: bool = False) -> None:
    """An identifier, name or label: one line, no control characters, at most ``max_chars``."""
    if not value:
        if required:
            v.add(field_path, "required")
        return
    if len(value) > max_chars:
        v.add(field_path, f"at most {max_chars} characters")
    elif _CONTROL_OR_WHITESPACE_CONTROL.search(value):
        v.add(field_path, "must not contain NUL or other control characters")


def check_text(v: Violations, value: str, field_path: str, *, max_chars: int, required: bool = False) -> None:
    """Free text (a prompt, a document, a reason): tab and newlines allowed, NUL and other controls not."""
    if not value:
        if required:
            v.add(field_path, "required")
        return
    if len(value) > max_chars:
        v.add(field_path, f"at most {max_chars} characters")
    elif "\x00" in value:
        v.add(field_path, "must not contain NUL characters")
    elif _CONTROL.search(value):
        v.add(field_path, "must not contain control characters other than tab and newline")


def check_no_nul(v: Violations, value: str, field_path: str) -> None:
    """Free text as callers write it (prompts, answers, documents): any character but NUL, which no backend
    or store of the mesh can carry; other control characters are the caller's business."""
    if "\x00" in value:
        v.add(field_path, "must not contain NUL characters")


def check_labels(v: Violations, labels: Mapping[str, str], field_path: str, *, max_labels: int = MAX_LABELS,
                 max_key_chars: int = MAX_LABEL_KEY_CHARS, max_value_chars: int = MAX_LABEL_VALUE_CHARS,
                 text_values: bool = False) -> None:
    """A string map (labels, metadata): bounded count, keys checked like names; values like names too, or
    with ``text_values`` like free text (tab and newlines allowed: a document's metadata may hold them)."""
    if len(labels) > max_labels:
        v.add(field_path, f"at most {max_labels} entries")
        return
    for key, value in labels.items():
        if not key:
            v.add(field_path, "keys must not be empty")
            continue
        check_name(v, key, f"{field_path}[{key[:max_key_chars]!r}]", max_chars=max_key_chars)
        check_value = check_text if text_values else check_name
        check_value(v, value, f"{field_path}[{key[:max_key_chars]!r}]", max_chars=max_value_chars)


def check_finite(v: Violations, value: float, field_path: str) -> None:
    """NaN and infinities are never a meaningful number in a request."""
    if not math.isfinite(value):
        v.add(field_path, "must be a finite number")


# What both Python's datetime and PostgreSQL's timestamptz hold: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799


def check_timestamp(v: Violations, seconds: int, nanos: int, field_path: str) -> bool:
    """A protobuf Timestamp's ``seconds``/``nanos``: years 1 to 9999, nanos in [0, 1e9). True when valid."""
    if not MIN_TIMESTAMP_S <= seconds <= MAX_TIMESTAMP_S:
        v.add(field_path, "must be between 0001-01-01 and 9999-12-31")
        return False
    if not 0 <= nanos < 1_000_000_000:
        v.add(field_path, "nanos must be between 0 and 999,999,999")
        return False
    return True


def check_token(v: Violations, value: str, field_path: str, *, max_chars: int = MAX_ID_CHARS,
                required: bool = False) -> None:
    """An id that is forwarded in HTTP headers: ASCII letters, digits, ``.``, ``_``, ``:`` and ``-`` only."""
    if not value:
        if required:
            v.add(field_path, "required")
        return
    if len(value) > max_chars:
        v.add(field_path, f"at most {max_chars} characters")
    elif not _TOKEN.fullmatch(value):
        v.add(field_path, "only ASCII letters, digits, '.', '_', ':' and '-'")

