"""A usage event with ordinary values, for ledger, spool and dead-letter tests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.router.ledger.events import UsageEvent


def usage_event(request_id: str = "r1", **changes: Any) -> UsageEvent:
    """An 'ok' cache-miss event of 10 input and 5 output tokens costing 1,000 nano-USD; ``changes`` set any field
    (also to values of the wrong type, as a forged or hand-edited entry would hold)."""
    now = datetime.now(UTC)
    event = UsageEvent(request_id=request_id, started_at=now, finished_at=now, org_id="o", team_id="t",
                       key_id="k", model="m", provider="p", input_tokens=10, output_tokens=5, cached_input_tokens=0,
                       cost_nano_usd=1_000, saved_nano_usd=0, price_version=1, cache_tier="miss", status="ok",
                       error_reason="", latency_ms=3, degraded=False)
    for name, value in changes.items():
        setattr(event, name, value)
    return event
