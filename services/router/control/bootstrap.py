"""First start of a deployment: schema, a default org/team, an admin key (printed once), default models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import asyncpg

from libs.pg_migrations import migrate
from services.router.control.plane import ControlPlane

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
BOOTSTRAP_ACTOR = "bootstrap"


@dataclass(frozen=True)
class DefaultModel:
    name: str
    provider: str
    inference_target: str
    context_window: int
    cost_tier: str
    input_per_mtok: int
    output_per_mtok: int
    cached_input_per_mtok: int


async def apply_migrations(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return await migrate(conn, MIGRATIONS)
    finally:
        await conn.close()


async def bootstrap(pool: asyncpg.Pool, models: list[DefaultModel]) -> str | None:
    """Create defaults that do not exist yet. Returns a new admin key, or None if one existed already."""
    control = ControlPlane(pool)
    async with pool.acquire() as conn:
        org_id = await conn.fetchval("SELECT org_id FROM orgs WHERE name = 'default'")
        team_id = await conn.fetchval("SELECT team_id FROM teams WHERE name = 'default' AND org_id = $1", org_id)
        has_admin = await conn.fetchval("SELECT 1 FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL")
        known_models = {r["name"] for r in await conn.fetch("SELECT name FROM models")}
        priced = {r["model"] for r in await conn.fetch("SELECT DISTINCT model FROM prices")}
    if org_id is None:
        org_id = await control.create_org(BOOTSTRAP_ACTOR, "default")
    if team_id is None:
        team_id = await control.create_team(BOOTSTRAP_ACTOR, org_id, "default")
    for m in models:
        if m.name not in known_models:
            await control.register_model(BOOTSTRAP_ACTOR, name=m.name, provider=m.provider,
                                         inference_target=m.inference_target, context_window=m.context_window,
                                         cost_tier=m.cost_tier)
        if m.name not in priced:
            await control.set_price(BOOTSTRAP_ACTOR, model=m.name, input_per_mtok=m.input_per_mtok,
                                    output_per_mtok=m.output_per_mtok,
                                    cached_input_per_mtok=m.cached_input_per_mtok, effective_from=None)
    if has_admin:
        return None
    created = await control.create_key(BOOTSTRAP_ACTOR, org_id=org_id, team_id=team_id, name="bootstrap-admin",
                                       role="admin", allowed_models=[], expires_at=None)
    return created.secret
