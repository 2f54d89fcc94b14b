"""Which limits and budgets apply to a request: subjects, levels, and where the numbers come from.

A request is limited at every level of the tenant hierarchy it belongs to (key, team, org,
client IP, global). The numbers live in PostgreSQL's ``limits`` table and the USD budgets in
its ``budgets`` table (0 = unlimited; budgets exist for key, team, org and global);
:class:`PostgresLimitStore` keeps both tables in memory and reloads them in the background,
so the hot path never waits on PostgreSQL.

Resolution for one level (first match wins):
1. the row ``(scope, scope_id)``;
2. the row ``(scope, '*')`` — a default for every id of that scope (e.g. all client IPs);
3. for keys only, the service's configured per-key default.
Global limits are every row with scope ``global`` whatever its scope_id (several such rows
are merged, the strictest non-zero number per kind winning). Budgets resolve the same way,
without a per-key default.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import asyncpg

from services.ratelimit.periodic import PeriodicTask

log = logging.getLogger(__name__)

WILDCARD = "*"


def normalize_ip(text: str) -> str:
    """One spelling per address (``2001:db8::1``; ``::ffff:10.0.0.1`` is ``10.0.0.1``), so one bucket.

    Raises ValueError when ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text)
    # ::ffff:a.b.c.d is the IPv4 client a.b.c.d seen through a dual-stack socket.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


class Scope(StrEnum):
    """A level of the tenant hierarchy; values are the ``limits.scope`` column's."""

    KEY = "key"
    TEAM = "team"
    ORG = "org"
    CLIENT_IP = "client_ip"
    GLOBAL = "global"


def _normalize_row_id(scope: Scope, scope_id: str) -> str:
    if scope is Scope.CLIENT_IP and scope_id != WILDCARD:
        try:
            return normalize_ip(scope_id)
        except ValueError:
            return scope_id  # matches nothing a validated request can carry; harmless
    return scope_id


class Kind(StrEnum):
    """What a limit counts; values are the ``limits`` column names.

    Every kind is a token bucket refilling continuously over its period, so tokens_per_day is
    a rolling 24 h allowance, not a calendar day that resets at midnight.
    """

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"

    @property
    def period_s(self) -> int:
        """The bucket refills completely over this many seconds."""
        return 86_400 if self is Kind.TOKENS_PER_DAY else 60

    @property
    def counts_tokens(self) -> bool:
        """Token kinds cost the estimate and are settled on commit; request kinds cost 1."""
        return self is not Kind.REQUESTS_PER_MINUTE

    @property
    def short(self) -> str:
        return _SHORT[self]


_SHORT = {Kind.REQUESTS_PER_MINUTE: "rpm", Kind.TOKENS_PER_MINUTE: "tpm", Kind.TOKENS_PER_DAY: "tpd"}


@dataclass(frozen=True)
class Limits:
    """The configured numbers of one level; 0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0

    def get(self, kind: Kind) -> int:
        return int(getattr(self, kind.value))

    def active(self) -> list[tuple[Kind, int]]:
        """The kinds that are limited, with their limits."""
        return [(kind, self.get(kind)) for kind in Kind if self.get(kind) > 0]

    @staticmethod
    def strictest(a: Limits, b: Limits) -> Limits:
        def pick(x: int, y: int) -> int:
            return min(x, y) if x and y else (x or y)

        return Limits(*(pick(a.get(k), b.get(k)) for k in Kind))


class Period(StrEnum):
    """A budget's window: a UTC calendar day or a UTC calendar month (not a rolling period)."""

    DAILY = "daily"
    MONTHLY = "monthly"

    @property
    def short(self) -> str:
        return "d" if self is Period.DAILY else "m"


@dataclass(frozen=True)
class Budgets:
    """The USD budgets of one level in nano-USD per window; 0 means no budget."""

    daily_nano_usd: int = 0
    monthly_nano_usd: int = 0

    def get(self, period: Period) -> int:
        return self.daily_nano_usd if period is Period.DAILY else self.monthly_nano_usd

    def active(self) -> list[tuple[Period, int]]:
        return [(period, self.get(period)) for period in Period if self.get(period) > 0]

    @staticmethod
    def strictest(a: Budgets, b: Budgets) -> Budgets:
        def pick(x: int, y: int) -> int:
            return min(x, y) if x and y else (x or y)

        return Budgets(pick(a.daily_nano_usd, b.daily_nano_usd), pick(a.monthly_nano_usd, b.monthly_nano_usd))


@dataclass(frozen=True)
class Subject:
    """Everything a request is limited by. ``client_ip`` may be empty (no per-IP limit then)."""

    org_id: str
    team_id: str
    key_id: str
    client_ip: str = ""

    def levels(self) -> list[tuple[Scope, str]]:
        out = [(Scope.KEY, self.key_id), (Scope.TEAM, self.team_id), (Scope.ORG, self.org_id)]
        if self.client_ip:
            out.append((Scope.CLIENT_IP, self.client_ip))
        out.append((Scope.GLOBAL, ""))
        return out


@dataclass(frozen=True)
class Level:
    """One level a request is limited at, with the limits and budgets configured for it."""

    scope: Scope
    scope_id: str
    limits: Limits
    budgets: Budgets = Budgets()

    @property
    def subject(self) -> str:
        """How a quota violation names this level: ``key:<id>``, ``team:<id>``, …, ``global``."""
        return self.scope.value if self.scope is Scope.GLOBAL else f"{self.scope.value}:{self.scope_id}"


BudgetRows = Mapping[tuple[Scope, str], Budgets]


class LimitTable:
    """An immutable snapshot of the configured limits and budgets, resolved per subject."""

    def __init__(self, rows: Mapping[tuple[Scope, str], Limits] | None = None, *,
                 key_default: Limits = Limits(), budgets: BudgetRows | None = None):
        self._rows: dict[tuple[Scope, str], Limits] = {}
        self._global = Limits()
        for (scope, scope_id), limits in (rows or {}).items():
            if scope is Scope.GLOBAL:
                self._global = Limits.strictest(self._global, limits)
            else:
                self._rows[(scope, _normalize_row_id(scope, scope_id))] = limits
        self._key_default = key_default
        self._budgets: dict[tuple[Scope, str], Budgets] = {}
        self._global_budgets = Budgets()
        for (scope, scope_id), budgets_ in (budgets or {}).items():
            if scope is Scope.GLOBAL:
                self._global_budgets = Budgets.strictest(self._global_budgets, budgets_)
            elif scope is not Scope.CLIENT_IP:  # the table has no per-IP budgets; ignore, not fail
                self._budgets[(scope, scope_id)] = budgets_

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def budget_rows(self) -> int:
        return len(self._budgets)

    def resolve_budgets(self, scope: Scope, scope_id: str) -> Budgets:
        if scope is Scope.GLOBAL:
            return self._global_budgets
        for candidate in (scope_id, WILDCARD):
            found = self._budgets.get((scope, candidate))
            if found is not None:
                return found
        return Budgets()

    def resolve(self, scope: Scope, scope_id: str) -> Limits:
        if scope is Scope.GLOBAL:
            return self._global
        for candidate in (scope_id, WILDCARD):
            found = self._rows.get((scope, candidate))
            if found is not None:
                return found  # an all-zero row means "unlimited", not "fall through to the default"
        return self._key_default if scope is Scope.KEY else Limits()

    def levels_for(self, subject: Subject) -> list[Level]:
        """Every level of the subject that has at least one limit or budget."""
        levels = [Level(scope, scope_id, self.resolve(scope, scope_id), self.resolve_budgets(scope, scope_id))
                  for scope, scope_id in subject.levels()]
        return [level for level in levels if level.limits.active() or level.budgets.active()]


class LimitStore(Protocol):
    """Where the configured limits and budgets come from. ``levels_for`` is on the hot path: no I/O.

    ``generation`` changes whenever the configuration may have (callers cache per generation).
    """

    @property
    def generation(self) -> int: ...

    def levels_for(self, subject: Subject) -> list[Level]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class StaticLimitStore:
    """Fixed limits: the configured defaults (no database), or any rows a test hands in."""

    def __init__(self, rows: Mapping[tuple[Scope, str], Limits] | None = None, *,
                 key_default: Limits = Limits(), budgets: BudgetRows | None = None):
        self._key_default = key_default
        self._rows = dict(rows or {})
        self._budgets = dict(budgets or {})
        self._table = LimitTable(self._rows, key_default=key_default, budgets=self._budgets)
        self.generation = 0

    def set_rows(self, rows: Mapping[tuple[Scope, str], Limits]) -> None:
        self._rows = dict(rows)
        self._table = LimitTable(self._rows, key_default=self._key_default, budgets=self._budgets)
        self.generation += 1

    def set_budgets(self, budgets: BudgetRows) -> None:
        self._budgets = dict(budgets)
        self._table = LimitTable(self._rows, key_default=self._key_default, budgets=self._budgets)
        self.generation += 1

    def levels_for(self, subject: Subject) -> list[Level]:
        return self._table.levels_for(subject)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


_WARN_EVERY_S = 60.0
_SELECT = ("SELECT scope, scope_id, requests_per_minute, tokens_per_minute, tokens_per_day FROM limits"
           " ORDER BY scope, scope_id")
_SELECT_BUDGETS = "SELECT scope, scope_id, daily_nano_usd, monthly_nano_usd FROM budgets ORDER BY scope, scope_id"


def rows_to_table(rows: Iterable[Mapping[str, Any]], key_default: Limits,
                  budget_rows: Iterable[Mapping[str, Any]] = ()) -> LimitTable:
    parsed: dict[tuple[Scope, str], Limits] = {}
    for row in rows:
        try:
            scope = Scope(row["scope"])
        except ValueError:
            continue  # the table's CHECK constraint forbids this; a newer scope is ignored, not fatal
        parsed[(scope, str(row["scope_id"]))] = Limits(
            int(row["requests_per_minute"]), int(row["tokens_per_minute"]), int(row["tokens_per_day"]))
    budgets: dict[tuple[Scope, str], Budgets] = {}
    for row in budget_rows:
        try:
            scope = Scope(row["scope"])
        except ValueError:
            continue
        budgets[(scope, str(row["scope_id"]))] = Budgets(int(row["daily_nano_usd"]), int(row["monthly_nano_usd"]))
    return LimitTable(parsed, key_default=key_default, budgets=budgets)


class PostgresLimitStore:
    """The ``limits`` and ``budgets`` tables, held in memory and reloaded every ``refresh_s``.

    If PostgreSQL cannot be read, the last good snapshot stays in force (at start: the defaults
    only) and loading is retried on the next tick; a rate limiter that refuses to start because
    its config store blinked would take the whole gateway down with it.
    """

    def __init__(self, pool: asyncpg.Pool, *, key_default: Limits = Limits(), refresh_s: float = 2.0,
                 query_timeout_s: float = 5.0):
        self._pool = pool
        self._key_default = key_default
        self._table = LimitTable(key_default=key_default)
        self.generation = 0
        self._loaded: tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]] | None = None
        self._query_timeout_s = query_timeout_s
        self._task = PeriodicTask("limits-refresh", refresh_s, self._refresh_quietly)
        # Monotonic time of the last successful load; None until the first one.
        self.loaded_at: float | None = None
        self._failing = False
        self._warned_at = 0.0

    def levels_for(self, subject: Subject) -> list[Level]:
        return self._table.levels_for(subject)

    async def refresh(self) -> int:
        """Load both tables now; returns the number of rows. Raises if PostgreSQL fails."""
        async with self._pool.acquire(timeout=self._query_timeout_s) as conn, conn.transaction(readonly=True):
            # One snapshot of both tables: a change to a limit and a budget made together arrives together.
            rows = await conn.fetch(_SELECT, timeout=self._query_timeout_s)
            budget_rows = await conn.fetch(_SELECT_BUDGETS, timeout=self._query_timeout_s)
        loaded = ([tuple(r) for r in rows], [tuple(r) for r in budget_rows])
        if loaded != self._loaded:  # an unchanged reload keeps callers' caches warm
            self._table = rows_to_table(rows, self._key_default, budget_rows)
            self._loaded = loaded
            self.generation += 1
        if self.loaded_at is None or self._failing:
            log.info("loaded %d limit rows and %d budget rows", len(rows), len(budget_rows))
        self._failing = False
        self.loaded_at = time.monotonic()
        return len(rows) + len(budget_rows)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:
            # Any failure (connection, timeout, missing table) keeps the old snapshot. Warn when it
            # starts and then once a minute, not on every tick of an outage.
            now = time.monotonic()
            if not self._failing or now - self._warned_at >= _WARN_EVERY_S:
                log.warning("could not reload limits and budgets, keeping the previous ones: %s: %s",
                            type(exc).__name__, exc)
                self._warned_at = now
            self._failing = True

    async def start(self) -> None:
        await self._refresh_quietly()
        self._task.start()

    async def close(self) -> None:
        await self._task.stop()
