"""The router bootstraps itself at startup (TOLLGATE_ROUTER_BOOTSTRAP_*), against a real PostgreSQL: schema,
default org and team, the given models with prices, and a first admin key written once to a 0600 file and
never logged; a restart creates nothing twice."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from pathlib import Path

import asyncpg
import grpc
import pydantic
import pytest
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.grpc_server import GrpcServer
from services.router.control.bootstrap import DefaultModel, bootstrap_at_startup
from services.router.db import create_pool
from services.router.server import build
from services.router.settings import RouterSettings

MODELS = [{"name": "m-boot", "provider": "openai", "inference_target": "127.0.0.1:1", "context_window": 8192,
           "cost_tier": "cheap", "input_per_mtok": 150_000_000, "output_per_mtok": 600_000_000,
           "cached_input_per_mtok": 75_000_000}]


def _settings(database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path, key_file: Path) -> RouterSettings:
    return RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url,
                          redis_prefix=redis_prefix, data_dir=str(tmp_path / "data"),
                          bootstrap_models_json=json.dumps(MODELS), bootstrap_admin_key_file=str(key_file))


async def _counts(database_url: str) -> tuple[int, int, int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM orgs WHERE name = 'default'), (SELECT count(*) FROM teams WHERE name = "
            "'default'), (SELECT count(*) FROM api_keys WHERE role = 'admin'), (SELECT count(*) FROM prices)")
        assert row is not None
        return row[0], row[1], row[2], row[3]
    finally:
        await conn.close()


async def test_the_router_bootstraps_itself_and_writes_the_admin_key_once(
        clean_env: None, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "secrets" / "bootstrap-admin.key"  # a folder that does not exist yet
    settings = _settings(database_url, redis_url, redis_prefix, tmp_path, key_file)
    with caplog.at_level(logging.DEBUG):
        bindings, close = await build(settings)  # a fresh database: migrations, then the bootstrap
    try:
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("tg-") and len(key) > 20
        assert key not in caplog.text
        assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]  # no temporary file left
        # Served as it will be: the key is an admin key, and the model and its price are there already.
        server = GrpcServer(settings, bindings)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                md = (("authorization", f"Bearer {key}"),)
                models = await admin.ListModels(admin_pb2.ListModelsRequest(), metadata=md, timeout=10)
                prices = await admin.ListPrices(admin_pb2.ListPricesRequest(model="m-boot"), metadata=md, timeout=10)
                keys = await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md, timeout=10)
        finally:
            await server.stop(0)
        assert [(m.name, m.inference_target, m.context_window) for m in models.models] == [
            ("m-boot", "127.0.0.1:1", 8192)]
        assert [(p.input_nano_usd_per_mtok, p.output_nano_usd_per_mtok, p.cached_input_nano_usd_per_mtok)
            for p in prices.prices] == [
            (150_000_000, 600_000_000, 75_000_000)]
        assert [(k.name, k.role) for k in keys.keys] == [("bootstrap-admin", admin_pb2.KEY_ROLE_ADMIN)]
    finally:
        await close()
    assert await _counts(database_url) == (1, 1, 1, 1)

    # A restart finds everything: no second org, key or price, and no key file.
    key_file.unlink()
    _, close = await build(settings)
    await close()
    assert not key_file.exists()
    assert await _counts(database_url) == (1, 1, 1, 1)


async def test_routers_starting_together_create_one_set_of_defaults(
        clean_env: None, database_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    _, close = await build(RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url,
                                          redis_prefix=redis_prefix, data_dir=str(tmp_path)))  # migrations only
    await close()
    assert await _counts(database_url) == (0, 0, 0, 0)  # without the setting, no bootstrap
    pools = [await create_pool(database_url) for _ in range(3)]
    try:
        models = [DefaultModel(**MODELS[0])]  # type: ignore[arg-type]
        written = await asyncio.gather(*(bootstrap_at_startup(p, models, tmp_path / f"key-{i}")
                                         for i, p in enumerate(pools)))
    finally:
        for p in pools:
            await p.close()
    assert sorted(written) == [False, False, True]
    assert len(list(tmp_path.glob("key-*"))) == 1
    assert await _counts(database_url) == (1, 1, 1, 1)


def test_bootstrap_settings_are_checked_at_start(clean_env: None) -> None:
    with pytest.raises(pydantic.ValidationError, match="bootstrap_admin_key_file is required"):
        RouterSettings(bootstrap_models_json=json.dumps(MODELS))
    with pytest.raises(pydantic.ValidationError, match="bootstrap_models_json"):
        RouterSettings(bootstrap_models_json='[{"name": "m"}]', bootstrap_admin_key_file="/tmp/k")
    with pytest.raises(pydantic.ValidationError, match="bootstrap_models_json"):
        RouterSettings(bootstrap_models_json="not json", bootstrap_admin_key_file="/tmp/k")
    assert RouterSettings(bootstrap_models_json=json.dumps(MODELS), bootstrap_admin_key_file="/tmp/k")
