"""First start of a deployment: schema, a default org/team, an admin key (printed once), default models.

The router bootstraps itself at startup when ``TOLLGATE_ROUTER_BOOTSTRAP_MODELS_JSON`` is set
(``server.build``): after the migrations, before the first registry load. A new admin key goes to
``TOLLGATE_ROUTER_BOOTSTRAP_ADMIN_KEY_FILE`` (mode 0600, never logged); whoever started the router
(``tollgate up``) reads it once the router is healthy, shows it, and deletes the file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from pydantic import TypeAdapter

from libs.pg_migrations import migrate
from services.router.control.plane import ControlPlane

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
BOOTSTRAP_ACTOR = "bootstrap"
# pg_advisory_lock key held while bootstrapping, so routers starting together create one default org.
BOOTSTRAP_LOCK_ID = 0x746F6C6C67617465  # "tollgate"


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


_DEFAULT_MODELS = TypeAdapter(list[DefaultModel])


def parse_default_models(text: str) -> list[DefaultModel]:
    """``[{"name": ..., "provider": ..., ...}]`` (the fields of ``DefaultModel``); raises ValueError."""
    return _DEFAULT_MODELS.validate_json(text)


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


async def bootstrap_at_startup(pool: asyncpg.Pool, models: list[DefaultModel], admin_key_file: Path) -> bool:
    """``bootstrap`` under an advisory lock; a new admin key is written to ``admin_key_file`` (mode 0600).
    Returns whether a key was written (False when an admin key existed already)."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", BOOTSTRAP_LOCK_ID)
        try:
            key = await bootstrap(pool, models)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", BOOTSTRAP_LOCK_ID)
    if key is None:
        return False
    write_secret(admin_key_file, key)
    return True


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by this user only: a 0600 temporary file in the same folder,
    renamed over ``path``, so a reader never sees a partial or world-readable file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created with mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
