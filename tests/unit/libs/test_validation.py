"""libs/validation.py: the text checks every service's request validation shares."""

from __future__ import annotations

import pytest

from libs.errors import Violations
from libs.validation import check_finite, check_labels, check_name, check_text


def _fields(check: object, *args: object, **kwargs: object) -> list[str]:
    v = Violations()
    check(v, *args, **kwargs)  # type: ignore[operator]
    return [item.field for item in v.items]


@pytest.mark.parametrize("value", ["a\x00b", "tab\there", "line\nbreak", "esc\x1b", "del\x7f"])
def test_a_name_refuses_every_control_character(value: str) -> None:
    assert _fields(check_name, value, "f", max_chars=64) == ["f"]


def test_a_name_is_bounded_and_may_be_required() -> None:
    assert _fields(check_name, "x" * 65, "f", max_chars=64) == ["f"]
    assert _fields(check_name, "", "f", max_chars=64, required=True) == ["f"]
    assert _fields(check_name, "", "f", max_chars=64) == []
    assert _fields(check_name, "caf\u00e9 \U0001f600", "f", max_chars=64) == []


@pytest.mark.parametrize(("value", "ok"), [("tab\tand\nnewline\r\n", True), ("nul\x00", False), ("bell\x07", False)])
def test_free_text_allows_tab_and_newlines_only(value: str, ok: bool) -> None:
    assert _fields(check_text, value, "f", max_chars=100) == ([] if ok else ["f"])


def test_labels_values_are_names_unless_text_values() -> None:
    multi_line = {"note": "first line\nsecond line"}
    assert _fields(check_labels, multi_line, "labels") == ["labels['note']"]
    assert _fields(check_labels, multi_line, "labels", text_values=True) == []
    assert _fields(check_labels, {"k": "v\x00"}, "labels", text_values=True) == ["labels['k']"]
    assert _fields(check_labels, {"k\n": "v"}, "labels", text_values=True) == ["labels['k\\n']"]
    assert _fields(check_labels, {"": "v"}, "labels") == ["labels"]
    assert _fields(check_labels, {str(i): "v" for i in range(33)}, "labels") == ["labels"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(value: float) -> None:
    assert _fields(check_finite, value, "f") == ["f"]
    assert _fields(check_finite, 1e308, "f") == []
