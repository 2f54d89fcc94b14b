"""Versioned SQL migrations for PostgreSQL (asyncpg).

Files are ``NNNN_name.sql`` in one folder, applied in order, each in its own
transaction, recorded in ``schema_migrations``. An advisory lock makes
concurrent starters (several routers) apply each migration exactly once.
Written by hand: the few lines here do not justify a migration framework.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK_ID = 0x746F6C6C  # "toll"


def migration_files(folder: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _FILE.match(p.name))]
    found.sort()
    versions = [v for v, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {folder}")
    return found


async def migrate(conn: asyncpg.Connection, folder: Path) -> list[int]:
    """Apply pending migrations; returns the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(folder):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, path.name)
            log.info("applied migration %s", path.name)
            applied_now.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied_now
