"""Models and prices, loaded from PostgreSQL into memory and refreshed in the background.

The request path reads only this in-memory snapshot: pricing a request is a
dictionary lookup, never a query (issue: "one cached lookup, not a query per request").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from services.router.control.pricing import Price, price_at
from services.router.db import acquire
from services.router.tasks import reload_forever

# The model name the complexity router answers to; no registered model may take it.
AUTO_MODEL = "auto"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    provider: str
    inference_target: str
    context_window: int
    cost_tier: str  # "cheap" | "strong"

    @property
    def targets(self) -> list[str]:
        """The inference replicas serving this model (``inference_target`` may list several, comma-separated)."""
        return [t.strip() for t in self.inference_target.split(",") if t.strip()]

@dataclass(frozen=True)
class RegistrySnapshot:
    models: dict[str, ModelEntry] = field(default_factory=dict)
    prices: dict[str, list[Price]] = field(default_factory=dict)


class Registry:
    def __init__(self, pool: asyncpg.Pool | None, refresh_s: float):
        self._pool = pool
        self._refresh_s = refresh_s
        self._snapshot = RegistrySnapshot()

    async def load(self) -> None:
        if self._pool is None:
            return
        async with acquire(self._pool) as conn:
            model_rows = await conn.fetch("SELECT name, provider, inference_target, context_window, cost_tier "
                                          "FROM models")
            price_rows = await conn.fetch(
                "SELECT price_version, model, input_nano_usd_per_mtok, output_nano_usd_per_mtok, "
                "cached_input_nano_usd_per_mtok, effective_from FROM prices ORDER BY model, effective_from")
        models = {r["name"]: ModelEntry(**dict(r)) for r in model_rows}
        prices: dict[str, list[Price]] = {}
        for r in price_rows:
            prices.setdefault(r["model"], []).append(Price(
                version=r["price_version"], model=r["model"], input_per_mtok=r["input_nano_usd_per_mtok"],
                output_per_mtok=r["output_nano_usd_per_mtok"],
                cached_input_per_mtok=r["cached_input_nano_usd_per_mtok"], effective_from=r["effective_from"]))
        self._snapshot = RegistrySnapshot(models, prices)

    def replace(self, snapshot: RegistrySnapshot) -> None:
        """Swap in a snapshot (tests, and callers that already hold fresh data)."""
        self._snapshot = snapshot

    async def refresh_forever(self) -> None:
        await reload_forever(self.load, self._refresh_s, "registry")

    def model(self, name: str) -> ModelEntry | None:
        return self._snapshot.models.get(name)

    def models(self) -> list[ModelEntry]:
        return sorted(self._snapshot.models.values(), key=lambda m: m.name)

    def price(self, model: str, when: datetime) -> Price | None:
        return price_at(self._snapshot.prices.get(model, []), when)
