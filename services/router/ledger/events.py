"""A usage event: what one served request cost, as the ledger stores it, and how a value the ledger's
columns cannot hold is made storable (``guard_event``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any


@dataclass
class UsageEvent:
    request_id: str
    started_at: datetime
    finished_at: datetime
    org_id: str
    team_id: str
    key_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    saved_nano_usd: int
    price_version: int | None
    cache_tier: str  # "miss" | "exact" | "semantic" | "none"
    status: str  # "ok" | "cancelled" | "error" | "rejected"
    error_reason: str
    latency_ms: int
    degraded: bool
    variant: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["finished_at"] = self.finished_at.isoformat()
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> UsageEvent:
        data: dict[str, Any] = json.loads(raw)
        data["started_at"] = datetime.fromisoformat(data["started_at"])
        data["finished_at"] = datetime.fromisoformat(data["finished_at"])
        return cls(**data)


# What parsing a stream entry into a UsageEvent can raise (RecursionError: absurdly nested JSON).
MALFORMED: tuple[type[BaseException], ...] = (ValueError, TypeError, KeyError, RecursionError)
MALFORMED_OR_NOT_AN_OBJECT: tuple[type[BaseException], ...] = (*MALFORMED, AttributeError)


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- what the ledger's column types could refuse ----------------------------------------------------
# The router validates requests (libs/validation.py) so none of this should happen; the writer still must
# not lose a served request's bill over a value PostgreSQL cannot store. A value is made storable, the
# row keeps its cost, and the label `ledger_guard` names the fields that were changed (logged by id).
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)
_INT4_FIELDS = ("input_tokens", "output_tokens", "cached_input_tokens", "latency_ms")  # integer columns
_INT8_FIELDS = ("cost_nano_usd", "saved_nano_usd", "price_version")  # bigint columns
_TEXT_FIELDS = ("org_id", "team_id", "key_id", "model", "provider", "cache_tier", "status", "error_reason",
                "variant")
GUARD_LABEL = "ledger_guard"


def _storable_text(value: str) -> str:
    # text and jsonb refuse NUL (and a lone surrogate cannot be encoded as UTF-8 at all).
    cleaned = value.replace("\x00", "\ufffd")
    try:
        cleaned.encode("utf-8")
    except UnicodeEncodeError:
        cleaned = cleaned.encode("utf-8", "replace").decode("utf-8")
    return cleaned


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def guard_event(e: UsageEvent) -> tuple[UsageEvent, list[str]]:
    """The event with every value storable in ``usage_ledger``, and the names of the fields that changed.

    Not changed: the request id (it is the row's identity: an id PostgreSQL refuses stays refused, visible in
    the dead-letter stream) and values of the wrong type (only a hand-edited event can have them)."""
    changes: dict[str, Any] = {}
    for name in _INT4_FIELDS + _INT8_FIELDS:
        value = getattr(e, name)
        if isinstance(value, int) and not isinstance(value, bool):
            clamped = _clamp(value, INT4 if name in _INT4_FIELDS else INT8)
            if clamped != value:
                changes[name] = clamped
    for name in _TEXT_FIELDS:
        value = getattr(e, name)
        if isinstance(value, str) and _storable_text(value) != value:
            changes[name] = _storable_text(value)
    for name in ("started_at", "finished_at"):
        value = getattr(e, name)
        if isinstance(value, datetime) and value.tzinfo is None:  # timestamptz: a naive time is taken as UTC
            changes[name] = value.replace(tzinfo=UTC)
    if isinstance(e.labels, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in e.labels.items()):
        labels = {_storable_text(k): _storable_text(v) for k, v in e.labels.items()}
        if labels != e.labels:
            changes["labels"] = labels
    if not changes:
        return e, []
    fields = sorted(changes)
    labels = changes.get("labels", e.labels)
    changes["labels"] = {**(labels if isinstance(labels, dict) else {}), GUARD_LABEL: ",".join(fields)}
    return replace(e, **changes), fields
