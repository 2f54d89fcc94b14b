"""The whole mesh as separate processes (started by the real launcher), against CI's Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from ops.cli import start_mesh
from ops.launcher import LauncherSettings, Mesh, free_port
from tests.support import infra

MODEL = "e2e-small"


@dataclass
class RunningMesh:
    mesh: Mesh
    admin_key: str
    database_url: str
    provider_url: str
    redis_prefix: str

    @property
    def router(self) -> str:
        return self.mesh.router_address

    @property
    def edge_url(self) -> str:
        """The OpenAI-compatible HTTP edge; the OpenAI API is under ``{edge_url}/v1``."""
        return self.mesh.edge_url

    def provider(self, **control: object) -> dict[str, object]:
        """Set fault modes on the fake provider; returns its counters."""
        with httpx.Client(base_url=self.provider_url, timeout=5) as client:
            if control:
                client.post("/_control", json=control).raise_for_status()
            state: dict[str, object] = client.get("/_control/state").json()
            return state

    async def provider_idle(self, timeout_s: float = 5.0) -> dict[str, object]:
        """The fake provider's counters once no stream is active (it noticed every disconnect), or at the timeout."""
        deadline = time.monotonic() + timeout_s
        state = self.provider()
        while state["active_streams"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            state = self.provider()
        return state

    async def ledger_row_of_key(self, key_id: str, timeout_s: float = 10.0) -> asyncpg.Record | None:
        """The first usage-ledger row of ``key_id``, waiting for the ledger writer (None at the timeout)."""
        deadline = time.monotonic() + timeout_s
        conn = await asyncpg.connect(self.database_url)
        try:
            while True:
                row = await conn.fetchrow("SELECT * FROM usage_ledger WHERE key_id = $1", key_id)
                if row is not None or time.monotonic() > deadline:
                    return row
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMesh]:
    db_name = infra.unique_name("tollgate_e2e")
    database_url = asyncio.run(infra.create_database(db_name))
    prefix = f"tgtest:{infra.unique_name('e2e')}:"
    data_dir: Path = tmp_path_factory.mktemp("mesh")
    provider_port = free_port()
    env = {
        "TOLLGATE_REDIS_PREFIX": prefix,
        "TOLLGATE_ROUTER_BREAKER_FAIL_MAX": "3",
        "TOLLGATE_ROUTER_BREAKER_RESET_TIMEOUT_S": "1.0",
        "TOLLGATE_RATELIMIT_LIMITS_REFRESH_S": "0.5",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings = LauncherSettings(data_dir=data_dir, redis_url=infra.REDIS_URL, database_url=database_url,
                                fake_provider_port=provider_port).model_copy(update={
        "router_port": free_port(), "cache_port": free_port(), "ratelimit_port": free_port(),
        "retrieval_port": free_port(), "inference_port": free_port(), "edge_port": free_port(), "provider_base_url": "",
        "inference_engine": "openai", "inference_models": MODEL})
    mesh: Mesh | None = None
    try:
        mesh, admin_key = start_mesh(settings)
        assert admin_key is not None
        yield RunningMesh(mesh, admin_key, database_url, f"http://127.0.0.1:{provider_port}", prefix)
    finally:
        if mesh is not None:
            mesh.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        asyncio.run(infra.drop_database(db_name))
        asyncio.run(infra.delete_redis_prefix(infra.REDIS_URL, prefix))
