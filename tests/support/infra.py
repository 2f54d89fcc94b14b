"""Real Redis and PostgreSQL for tests, isolated per run.

URLs come from TOLLGATE_TEST_REDIS_URL / TOLLGATE_TEST_DATABASE_URL, else the CI
defaults (127.0.0.1:6379 and :5432). Each run gets its own Redis key prefix and
its own PostgreSQL database, removed afterwards.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

# The launcher's helper, re-exported: tests and `tollgate up` pick ports the same way.
from ops.launcher import free_port as free_port

REDIS_URL = os.environ.get("TOLLGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_DATABASE_URL = os.environ.get("TOLLGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def database_url(name: str) -> str:
    parts = urlsplit(ADMIN_DATABASE_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def create_database(name: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(name)


async def drop_database(name: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_DATABASE_URL)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def delete_redis_prefix(url: str, prefix: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i:i + 500])
    finally:
        await client.aclose()
