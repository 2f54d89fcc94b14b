"""Prices and cost arithmetic, in integer billionths of a USD (nano-USD): exact, no float drift."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from libs.chat import TokenUsage

_PER_MTOK = 1_000_000


@dataclass(frozen=True)
class Price:
    version: int
    model: str
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int
    effective_from: datetime

    def cost(self, usage: TokenUsage) -> int:
        """Cost of a generation. Cached input tokens are billed at the cached rate, once (not also as input)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        fresh = usage.input_tokens - cached
        total = (fresh * self.input_per_mtok + cached * self.cached_input_per_mtok
                 + usage.output_tokens * self.output_per_mtok)
        # Round half up to the nearest nano-USD.
        return (total + _PER_MTOK // 2) // _PER_MTOK


FREE = Price(version=0, model="", input_per_mtok=0, output_per_mtok=0, cached_input_per_mtok=0,
             effective_from=datetime.min)


def price_at(versions: list[Price], when: datetime) -> Price | None:
    """The version in force at ``when``: latest effective_from <= when (versions sorted ascending)."""
    found: Price | None = None
    for p in versions:
        if p.effective_from <= when:
            found = p
        else:
            break
    return found
