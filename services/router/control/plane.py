"""The control plane: orgs, teams, keys, limits, budgets, models, prices, usage reports, audit.

Every change runs in one transaction with its audit row (who, what, before, after), so
there is no change without its audit row and no audit row for a change that rolled back.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg

from libs.chat import Principal
from libs.errors import AlreadyExists, FailedPrecondition, FieldViolation, InvalidArgument, NotFound, Violations
from services.router.control.keys import KEY_TIERS, KeyRecord, display_prefix, hash_key, new_key
from services.router.db import acquire

SCOPES = ("global", "org", "team", "key", "client_ip")
GROUP_COLUMNS = {"org": "org_id", "team": "team_id", "key": "key_id", "model": "model",
                 "day": "to_char(date_trunc('day', started_at AT TIME ZONE 'UTC'), 'YYYY-MM-DD')"}


class RevocationPublisher(Protocol):
    """Tells every router a key was revoked (``keys.RevocationBus``); best effort, after the commit."""

    async def publish(self, key_id: str) -> None: ...


def _new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"


def _record_from_row(r: asyncpg.Record) -> KeyRecord:
    return KeyRecord(key_id=r["key_id"], principal=Principal(r["org_id"], r["team_id"], r["key_id"]),
                     role=r["role"], allowed_models=tuple(r["allowed_models"]), expires_at=r["expires_at"],
                     revoked=r["revoked_at"] is not None, tier=r["tier"])


@dataclass(frozen=True)
class CreatedKey:
    key_id: str
    secret: str


@dataclass(frozen=True)
class KeyListing:
    record: KeyRecord
    name: str
    display_prefix: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class Org:
    org_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class Team:
    team_id: str
    org_id: str
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ScopeLimits:
    scope: str
    scope_id: str
    requests_per_minute: int
    tokens_per_minute: int
    tokens_per_day: int
    updated_at: datetime


@dataclass(frozen=True)
class ScopeBudget:
    scope: str
    scope_id: str
    daily_nano_usd: int
    monthly_nano_usd: int
    updated_at: datetime


@dataclass(frozen=True)
class PriceRow:
    price_version: int
    model: str
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int
    effective_from: datetime
    created_at: datetime


@dataclass(frozen=True)
class UsageRow:
    group_values: tuple[str, ...]
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    saved_nano_usd: int
    cache_hits: int
    errors: int
    cancelled: int = 0


@dataclass(frozen=True)
class AuditEntry:
    id: int
    actor_key_id: str
    action: str
    target: str
    before_json: str
    after_json: str
    at: datetime


class ControlPlane:
    def __init__(self, pool: asyncpg.Pool, revocations: RevocationPublisher | None = None):
        self._pool = pool
        self._revocations = revocations

    # --- keys (also the router's KeyLookup) --------------------------------------

    async def find_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        async with acquire(self._pool) as conn:
            row = await conn.fetchrow(
                "SELECT key_id, org_id, team_id, role, allowed_models, expires_at, revoked_at, tier "
                "FROM api_keys WHERE key_hash = $1", key_hash)
        return _record_from_row(row) if row else None

    async def create_org(self, actor: str, name: str) -> str:
        _require(name, "name")
        org_id = _new_id("org")
        async with acquire(self._pool) as conn, conn.transaction():
            try:
                await conn.execute("INSERT INTO orgs (org_id, name) VALUES ($1, $2)", org_id, name)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"an org named {name!r} exists") from None
            await _audit(conn, actor, "create_org", org_id, None, {"name": name})
        return org_id

    async def create_team(self, actor: str, org_id: str, name: str) -> str:
        _require(org_id, "org_id", name, "name")
        team_id = _new_id("team")
        async with acquire(self._pool) as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM orgs WHERE org_id = $1", org_id):
                raise NotFound(f"org {org_id} not found")
            try:
                await conn.execute("INSERT INTO teams (team_id, org_id, name) VALUES ($1, $2, $3)",
                                   team_id, org_id, name)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"team {name!r} exists in {org_id}") from None
            await _audit(conn, actor, "create_team", team_id, None, {"org_id": org_id, "name": name})
        return team_id

    async def create_key(self, actor: str, *, org_id: str, team_id: str, name: str, role: str,
                         allowed_models: list[str], expires_at: datetime | None, tier: str = "pro") -> CreatedKey:
        _require(org_id, "org_id", team_id, "team_id", name, "name")
        if role not in ("admin", "member"):
            raise InvalidArgument([FieldViolation("role", "must be admin or member")])
        if tier not in KEY_TIERS:
            raise InvalidArgument([FieldViolation("tier", f"must be one of {', '.join(KEY_TIERS)}")])
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise InvalidArgument([FieldViolation("expires_at", "must be in the future")])
        secret = new_key()
        key_id = _new_id("key")
        async with acquire(self._pool) as conn, conn.transaction():
            team_org = await conn.fetchval("SELECT org_id FROM teams WHERE team_id = $1", team_id)
            if team_org is None:
                raise NotFound(f"team {team_id} not found")
            if team_org != org_id:
                raise FailedPrecondition(f"team {team_id} does not belong to org {org_id}")
            await conn.execute(
                "INSERT INTO api_keys (key_id, key_hash, display_prefix, org_id, team_id, name, role, "
                "allowed_models, expires_at, tier) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                key_id, hash_key(secret), display_prefix(secret), org_id, team_id, name, role,
                allowed_models, expires_at, tier)
            await _audit(conn, actor, "create_key", key_id, None,
                         {"org_id": org_id, "team_id": team_id, "name": name, "role": role, "tier": tier,
                          "allowed_models": allowed_models, "expires_at": expires_at,
                          "display_prefix": display_prefix(secret)})
        return CreatedKey(key_id, secret)

    async def revoke_key(self, actor: str, key_id: str) -> None:
        """Revoke a key (idempotent) and tell every router, which then rejects it at once."""
        _require(key_id, "key_id")
        async with acquire(self._pool) as conn, conn.transaction():
            before = await conn.fetchval("SELECT revoked_at FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id)
            revoked = await conn.fetchval(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = $1 "
                "RETURNING revoked_at", key_id)
            if revoked is None:
                raise NotFound(f"key {key_id} not found")
            await _audit(conn, actor, "revoke_key", key_id, {"revoked": before is not None, "revoked_at": before},
                         {"revoked": True, "revoked_at": revoked})
        # After the commit: a router that hears it re-reads nothing it could find unrevoked.
        if self._revocations is not None:
            await self._revocations.publish(key_id)

    async def list_keys(self, org_id: str, team_id: str) -> list[KeyListing]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(
                "SELECT key_id, org_id, team_id, name, role, allowed_models, display_prefix, expires_at, "
                "revoked_at, created_at, tier FROM api_keys "
                "WHERE ($1 = '' OR org_id = $1) AND ($2 = '' OR team_id = $2) "
                "ORDER BY created_at, key_id", org_id, team_id)
        return [KeyListing(_record_from_row(r), r["name"], r["display_prefix"], r["created_at"], r["revoked_at"])
                for r in rows]

    async def list_orgs(self) -> list[Org]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch("SELECT org_id, name, created_at FROM orgs ORDER BY name")
        return [Org(r["org_id"], r["name"], r["created_at"]) for r in rows]

    async def list_teams(self, org_id: str) -> list[Team]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch("SELECT team_id, org_id, name, created_at FROM teams "
                                    "WHERE ($1 = '' OR org_id = $1) ORDER BY org_id, name", org_id)
        return [Team(r["team_id"], r["org_id"], r["name"], r["created_at"]) for r in rows]

    # --- limits and budgets --------------------------------------------------------

    async def set_limits(self, actor: str, scope: str, scope_id: str, rpm: int, tpm: int, tpd: int) -> None:
        _check_scope(scope, scope_id)
        async with acquire(self._pool) as conn, conn.transaction():
            before = await conn.fetchrow("SELECT requests_per_minute, tokens_per_minute, tokens_per_day "
                                         "FROM limits WHERE scope = $1 AND scope_id = $2", scope, scope_id)
            await conn.execute(
                "INSERT INTO limits (scope, scope_id, requests_per_minute, tokens_per_minute, tokens_per_day) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, scope_id) DO UPDATE SET "
                "requests_per_minute = $3, tokens_per_minute = $4, tokens_per_day = $5, updated_at = now()",
                scope, scope_id, rpm, tpm, tpd)
            await _audit(conn, actor, "set_limits", f"{scope}:{scope_id}", dict(before) if before else None,
                         {"requests_per_minute": rpm, "tokens_per_minute": tpm, "tokens_per_day": tpd})

    async def set_budget(self, actor: str, scope: str, scope_id: str, daily: int, monthly: int) -> None:
        _check_scope(scope, scope_id)
        if scope == "client_ip":
            raise InvalidArgument([FieldViolation("scope", "budgets apply to global, org, team or key")])
        async with acquire(self._pool) as conn, conn.transaction():
            before = await conn.fetchrow("SELECT daily_nano_usd, monthly_nano_usd FROM budgets "
                                         "WHERE scope = $1 AND scope_id = $2", scope, scope_id)
            await conn.execute(
                "INSERT INTO budgets (scope, scope_id, daily_nano_usd, monthly_nano_usd) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (scope, scope_id) DO UPDATE SET daily_nano_usd = $3, monthly_nano_usd = $4, "
                "updated_at = now()", scope, scope_id, daily, monthly)
            await _audit(conn, actor, "set_budget", f"{scope}:{scope_id}", dict(before) if before else None,
                         {"daily_nano_usd": daily, "monthly_nano_usd": monthly})

    async def list_limits(self, scope: str, scope_id: str) -> tuple[list[ScopeLimits], list[ScopeBudget]]:
        """Stored limits and budgets, optionally of one scope (empty strings: all)."""
        async with acquire(self._pool) as conn:
            limits = await conn.fetch(
                "SELECT scope, scope_id, requests_per_minute, tokens_per_minute, tokens_per_day, updated_at "
                "FROM limits WHERE ($1 = '' OR scope = $1) AND ($2 = '' OR scope_id = $2) ORDER BY scope, scope_id",
                scope, scope_id)
            budgets = await conn.fetch(
                "SELECT scope, scope_id, daily_nano_usd, monthly_nano_usd, updated_at FROM budgets "
                "WHERE ($1 = '' OR scope = $1) AND ($2 = '' OR scope_id = $2) ORDER BY scope, scope_id",
                scope, scope_id)
        return ([ScopeLimits(**dict(r)) for r in limits], [ScopeBudget(**dict(r)) for r in budgets])

    # --- models and prices ----------------------------------------------------------

    async def register_model(self, actor: str, *, name: str, provider: str, inference_target: str,
                             context_window: int, cost_tier: str) -> None:
        async with acquire(self._pool) as conn, conn.transaction():
            before = await conn.fetchrow("SELECT provider, inference_target, context_window, cost_tier "
                                         "FROM models WHERE name = $1", name)
            await conn.execute(
                "INSERT INTO models (name, provider, inference_target, context_window, cost_tier) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET provider = $2, "
                "inference_target = $3, context_window = $4, cost_tier = $5, updated_at = now()",
                name, provider, inference_target, context_window, cost_tier)
            await _audit(conn, actor, "register_model", name, dict(before) if before else None,
                         {"provider": provider, "inference_target": inference_target,
                          "context_window": context_window, "cost_tier": cost_tier})

    async def set_price(self, actor: str, *, model: str, input_per_mtok: int, output_per_mtok: int,
                        cached_input_per_mtok: int, effective_from: datetime | None) -> int:
        now = datetime.now(UTC)
        when = effective_from or now
        if when < now.replace(microsecond=0):
            # Back-dating would re-price requests already billed.
            raise InvalidArgument([FieldViolation("effective_from", "must not be in the past")])
        async with acquire(self._pool) as conn, conn.transaction():
            if not await conn.fetchval("SELECT 1 FROM models WHERE name = $1", model):
                raise NotFound(f"model {model} not registered")
            # "before" is the latest version so far: the audit row shows what the new one supersedes.
            previous = await conn.fetchrow(
                "SELECT price_version, input_nano_usd_per_mtok AS input, output_nano_usd_per_mtok AS output, "
                "cached_input_nano_usd_per_mtok AS cached_input, effective_from FROM prices WHERE model = $1 "
                "ORDER BY effective_from DESC LIMIT 1", model)
            try:
                version: int = await conn.fetchval(
                    "INSERT INTO prices (model, input_nano_usd_per_mtok, output_nano_usd_per_mtok, "
                    "cached_input_nano_usd_per_mtok, effective_from) VALUES ($1, $2, $3, $4, $5) "
                    "RETURNING price_version", model, input_per_mtok, output_per_mtok, cached_input_per_mtok, when)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"a price for {model} already starts at {when.isoformat()}") from None
            await _audit(conn, actor, "set_price", model, dict(previous) if previous else None,
                         {"price_version": version, "input": input_per_mtok, "output": output_per_mtok,
                          "cached_input": cached_input_per_mtok, "effective_from": when.isoformat()})
        return version

    async def list_prices(self, model: str) -> list[PriceRow]:
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(
                "SELECT price_version, model, input_nano_usd_per_mtok, output_nano_usd_per_mtok, "
                "cached_input_nano_usd_per_mtok, effective_from, created_at FROM prices "
                "WHERE ($1 = '' OR model = $1) ORDER BY model, effective_from", model)
        return [PriceRow(r["price_version"], r["model"], r["input_nano_usd_per_mtok"], r["output_nano_usd_per_mtok"],
                         r["cached_input_nano_usd_per_mtok"], r["effective_from"], r["created_at"]) for r in rows]

    # --- reports ----------------------------------------------------------------------

    async def usage_report(self, start: datetime, end: datetime, group_by: list[str]) -> list[UsageRow]:
        if end <= start:
            raise InvalidArgument([FieldViolation("end_time", "must be after start_time")])
        cols = [GROUP_COLUMNS[g] for g in group_by]
        select_groups = ", ".join(f"{c} AS g{i}" for i, c in enumerate(cols))
        group_clause = f"GROUP BY {', '.join(f'g{i}' for i in range(len(cols)))} ORDER BY 1" if cols else ""
        sql = (
            # sum() of integers is numeric in PostgreSQL; cast back so amounts stay exact integers.
            f"SELECT {select_groups + ',' if cols else ''} count(*) AS requests, "
            "coalesce(sum(input_tokens), 0)::bigint AS input_tokens, "
            "coalesce(sum(output_tokens), 0)::bigint AS output_tokens, "
            "coalesce(sum(cached_input_tokens), 0)::bigint AS cached_input_tokens, "
            "coalesce(sum(cost_nano_usd), 0)::bigint AS cost, coalesce(sum(saved_nano_usd), 0)::bigint AS saved, "
            "count(*) FILTER (WHERE cache_tier IN ('exact', 'semantic')) AS cache_hits, "
            "count(*) FILTER (WHERE status = 'error') AS errors, "
            "count(*) FILTER (WHERE status = 'cancelled') AS cancelled "
            f"FROM usage_ledger WHERE started_at >= $1 AND started_at < $2 {group_clause}")
        async with acquire(self._pool) as conn:
            rows = await conn.fetch(sql, start, end)
        return [UsageRow(tuple(str(r[f"g{i}"]) for i in range(len(cols))), r["requests"], r["input_tokens"],
                         r["output_tokens"], r["cached_input_tokens"], r["cost"], r["saved"], r["cache_hits"],
                         r["errors"], r["cancelled"]) for r in rows]

    async def audit_events(self, limit: int, *, target: str = "", action: str = "") -> list[AuditEntry]:
        """Newest first, optionally only for one target and/or action."""
        async with acquire(self._pool) as conn:
            rows = await conn.fetch("SELECT id, actor_key_id, action, target, before, after, at FROM audit_log "
                                    "WHERE ($2 = '' OR target = $2) AND ($3 = '' OR action = $3) "
                                    "ORDER BY id DESC LIMIT $1", limit, target, action)
        return [AuditEntry(r["id"], r["actor_key_id"], r["action"], r["target"], r["before"] or "",
                           r["after"] or "", r["at"]) for r in rows]


async def _audit(conn: asyncpg.Connection, actor: str, action: str, target: str,
                 before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor_key_id, action, target, before, after) VALUES ($1, $2, $3, $4, $5)",
        actor, action, target, json.dumps(before, default=str) if before is not None else None,
        json.dumps(after, default=str) if after is not None else None)


def _require(*pairs: str) -> None:
    v = Violations()
    for value, name in zip(pairs[::2], pairs[1::2], strict=True):
        v.check(bool(value and value.strip()), name, "required")
        v.check(len(value) <= 200, name, "at most 200 characters")
    v.raise_if_any()


def _check_scope(scope: str, scope_id: str) -> None:
    v = Violations()
    v.check(scope in SCOPES, "scope", f"must be one of {', '.join(SCOPES)}")
    v.check(scope == "global" or bool(scope_id), "scope_id", "required for this scope")
    v.raise_if_any()
