"""The router's AdminService in-process (real gRPC, real PostgreSQL), for the ops code that reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from tollgate.router.v1 import admin_pb2_grpc

from libs.grpc_server import GrpcServer, ServiceBinding
from ops.admin_cli import AdminApi
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import apply_migrations, bootstrap
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.pipeline.authenticate import Authenticator
from services.router.settings import RouterSettings


@dataclass
class RouterAdmin:
    """AdminService on ``address``; ``api`` is the CLI's adapter over it with the bootstrap admin key."""

    api: AdminApi
    pool: asyncpg.Pool
    control: ControlPlane
    address: str
    admin_key: str


@pytest.fixture
async def router_admin(clean_env: None, database_url: str) -> AsyncIterator[RouterAdmin]:
    await apply_migrations(database_url)
    pool = await create_pool(database_url)
    # The admin key lives in the bootstrap's own "default" org and team, apart from what a test seeds.
    admin_key = await bootstrap(pool, [])
    assert admin_key is not None
    control = ControlPlane(pool)
    registry = Registry(pool, 60)
    await registry.load()
    servicer = AdminServicer(control, Authenticator(control, cache_ttl_s=1.0), registry)
    server = GrpcServer(RouterSettings(host="127.0.0.1", port=0, database_url=database_url), [ServiceBinding(
        "tollgate.router.v1.AdminService", lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, s))])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RouterAdmin(AdminApi(channel, admin_key), pool, control, f"127.0.0.1:{port}", admin_key)
    finally:
        await channel.close()
        await server.stop(0)
        await pool.close()
