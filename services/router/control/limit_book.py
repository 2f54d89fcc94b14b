"""Every key's, team's and org's rate limits and USD budgets, read from PostgreSQL into memory.

The ratelimit service owns enforcement; the router keeps this copy only for its local limiter
(``pipeline/local_limits.py``), which stands in while the ratelimit service is unreachable. The
tables are the ones the ratelimit service reads (``limits``, ``budgets``; 0 = unlimited), loaded
in the background every ``registry_refresh_s``: the request path reads the snapshot, never a query.

Resolution per level, as in ``services/ratelimit/limits.py``: the row ``(scope, id)``, else the row
``(scope, '*')``, else (keys, rate limits only) the configured per-key default; every ``global`` row
merges to the strictest non-zero number. Client-IP limits are left to the ratelimit service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import asyncpg

from services.router.db import acquire
from services.router.tasks import reload_forever

WILDCARD = "*"
KEY, TEAM, ORG, GLOBAL = "key", "team", "org", "global"


@dataclass(frozen=True)
class LevelLimits:
    """The numbers of one level; 0 means unlimited. Budgets in nano-USD per UTC day / month."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    daily_nano_usd: int = 0
    monthly_nano_usd: int = 0

    def any(self) -> bool:
        return any((self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day,
                    self.daily_nano_usd, self.monthly_nano_usd))

    @staticmethod
    def strictest(a: LevelLimits, b: LevelLimits) -> LevelLimits:
        def pick(x: int, y: int) -> int:
            return min(x, y) if x and y else (x or y)

        return LevelLimits(*(pick(x, y) for x, y in zip(a.as_tuple(), b.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int]:
        return (self.requests_per_minute, self.tokens_per_minute, self.tokens_per_day, self.daily_nano_usd,
                self.monthly_nano_usd)


@dataclass(frozen=True)
class Level:
    """One level a request is limited at: ``scope`` key/team/org/global, its id ('' for global)."""

    scope: str
    scope_id: str
    limits: LevelLimits

    @property
    def subject(self) -> str:
        """How a quota violation names it, as the ratelimit service does: ``key:<id>``, …, ``global``."""
        return self.scope if self.scope == GLOBAL else f"{self.scope}:{self.scope_id}"


@dataclass(frozen=True)
class LimitSnapshot:
    rates: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    budgets: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    key_default: tuple[int, int, int] = (0, 0, 0)

    def _rates(self, scope: str, scope_id: str) -> tuple[int, int, int]:
        for candidate in (scope_id, WILDCARD):
            found = self.rates.get((scope, candidate))
            if found is not None:
                return found  # an all-zero row means "unlimited", not "use the default"
        return self.key_default if scope == KEY else (0, 0, 0)

    def _budgets(self, scope: str, scope_id: str) -> tuple[int, int]:
        for candidate in (scope_id, WILDCARD):
            found = self.budgets.get((scope, candidate))
            if found is not None:
                return found
        return (0, 0)

    @cached_property
    def _global(self) -> LevelLimits:
        """Every ``global`` row merged (computed once per snapshot, not per request)."""
        merged = LevelLimits()
        for (scope, _), rates in self.rates.items():
            if scope == GLOBAL:
                merged = LevelLimits.strictest(merged, LevelLimits(*rates))
        for (scope, _), budgets in self.budgets.items():
            if scope == GLOBAL:
                merged = LevelLimits.strictest(merged, LevelLimits(0, 0, 0, *budgets))
        return merged

    def levels_for(self, org_id: str, team_id: str, key_id: str) -> list[Level]:
        """Every level of the principal with at least one limit or budget."""
        levels = [Level(scope, scope_id, LevelLimits(*self._rates(scope, scope_id), *self._budgets(scope, scope_id)))
                  for scope, scope_id in ((KEY, key_id), (TEAM, team_id), (ORG, org_id))]
        levels.append(Level(GLOBAL, "", self._global))
        return [level for level in levels if level.limits.any()]


class LimitBook:
    """The ``limits`` and ``budgets`` tables in memory, reloaded in the background (``refresh_forever``).

    A failed reload keeps the last snapshot; before the first load there are no limits (the local
    limiter then admits, as the router did before it existed)."""

    def __init__(self, pool: asyncpg.Pool | None, refresh_s: float, *,
                 key_default: tuple[int, int, int] = (0, 0, 0)):
        self._pool = pool
        self._refresh_s = refresh_s
        self._key_default = key_default
        self._snapshot = LimitSnapshot(key_default=key_default)
        self.loaded = False

    async def load(self) -> None:
        if self._pool is None:
            return
        async with acquire(self._pool) as conn, conn.transaction(readonly=True):
            rate_rows = await conn.fetch("SELECT scope, scope_id, requests_per_minute, tokens_per_minute, "
                                         "tokens_per_day FROM limits WHERE scope <> 'client_ip'")
            budget_rows = await conn.fetch("SELECT scope, scope_id, daily_nano_usd, monthly_nano_usd FROM budgets")
        self._snapshot = LimitSnapshot(
            {(r["scope"], r["scope_id"]): (int(r["requests_per_minute"]), int(r["tokens_per_minute"]),
                                           int(r["tokens_per_day"])) for r in rate_rows},
            {(r["scope"], r["scope_id"]): (int(r["daily_nano_usd"]), int(r["monthly_nano_usd"]))
             for r in budget_rows},
            self._key_default)
        self.loaded = True

    def replace(self, snapshot: LimitSnapshot) -> None:
        """Swap in a snapshot (tests)."""
        self._snapshot = snapshot

    async def refresh_forever(self) -> None:
        await reload_forever(self.load, self._refresh_s, "limits")

    def levels_for(self, org_id: str, team_id: str, key_id: str) -> list[Level]:
        return self._snapshot.levels_for(org_id, team_id, key_id)
