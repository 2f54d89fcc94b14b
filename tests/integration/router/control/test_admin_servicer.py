"""AdminService over real gRPC (in-process server), real PostgreSQL and Redis: roles on every RPC,
an audit row with before/after for every change, the new listing RPCs, and no raw key anywhere."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from google.protobuf import message_factory, timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.grpc_server import GrpcServer, ServiceBinding
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import DefaultModel, apply_migrations, bootstrap
from services.router.control.keys import RevocationBus
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.pipeline.authenticate import Authenticator
from services.router.settings import RouterSettings

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]


@dataclass
class Admin:
    stub: admin_pb2_grpc.AdminServiceStub
    pool: asyncpg.Pool
    admin_key: str
    admin_key_id: str
    member_key: str
    org_id: str
    team_id: str

    def md(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.admin_key}"),)


@pytest.fixture
async def admin(clean_env: None, database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Admin]:
    await apply_migrations(database_url)
    pool = await create_pool(database_url)
    client = redis.Redis.from_url(redis_url)
    admin_key = await bootstrap(pool, [DefaultModel("m-cheap", "fake", "127.0.0.1:1", 8192, "cheap", 100, 200, 50)])
    assert admin_key is not None
    control = ControlPlane(pool, RevocationBus(client, redis_prefix))
    auth = Authenticator(control, cache_ttl_s=1.0)
    registry = Registry(pool, 60)
    await registry.load()
    [listing] = await control.list_keys("", "")
    p = listing.record.principal
    member = await control.create_key("test", org_id=p.org_id, team_id=p.team_id, name="member", role="member",
                                      allowed_models=[], expires_at=None)
    servicer = AdminServicer(control, auth, registry)
    settings = RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url)
    server = GrpcServer(settings, [ServiceBinding(
        "tollgate.router.v1.AdminService", lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, s))])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Admin(admin_pb2_grpc.AdminServiceStub(channel), pool, admin_key, p.key_id, member.secret, p.org_id,
                    p.team_id)
    finally:
        await channel.close()
        await server.stop(0)
        await client.aclose()
        await pool.close()


def _empty_request(method_name: str) -> object:
    method = ADMIN_SERVICE.methods_by_name[method_name]
    return message_factory.GetMessageClass(method.input_type)()


async def _audit_count(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        count: int = await conn.fetchval("SELECT count(*) FROM audit_log")
        return count


async def test_every_admin_rpc_needs_an_admin_key(admin: Admin) -> None:
    # Every RPC the service descriptor lists, so a new RPC is covered without anyone adding it here.
    before = await _audit_count(admin.pool)
    cases = [
        (admin.md(admin.member_key), grpc.StatusCode.PERMISSION_DENIED),
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (admin.md("tg-not-a-real-key"), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Basic {admin.admin_key}"),), grpc.StatusCode.UNAUTHENTICATED),
    ]
    checked = []
    for method in sorted(ADMIN_SERVICE.methods_by_name):
        call = getattr(admin.stub, method)
        for metadata, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(_empty_request(method), metadata=metadata, timeout=10)
            assert err.value.code() == code, (method, code, err.value.details())
            assert admin.member_key not in (err.value.details() or "")
            assert admin.admin_key not in (err.value.details() or "")
            checked.append((method, code))
    assert len(checked) == 4 * len(ADMIN_SERVICE.methods_by_name) >= 4 * 16
    assert await _audit_count(admin.pool) == before  # nothing was changed on the way to the refusal


async def test_the_role_check_covers_every_rpc_of_the_service() -> None:
    # The parametrization above reads the service descriptor: a new RPC is tested without anyone listing it.
    assert {"CreateKey", "RevokeKey", "SetLimits", "SetBudget", "RegisterModel", "SetPrice", "GetUsageReport",
            "ListAuditEvents", "ListOrgs", "ListTeams", "ListLimits", "ListPrices"} <= set(
        ADMIN_SERVICE.methods_by_name)
    for name in ADMIN_SERVICE.methods_by_name:
        assert hasattr(AdminServicer, name), f"AdminServicer does not implement {name}"


async def test_a_revoked_admin_key_loses_access(admin: Admin) -> None:
    second = await admin.stub.CreateKey(admin_pb2.CreateKeyRequest(
        org_id=admin.org_id, team_id=admin.team_id, name="second-admin", role=admin_pb2.KEY_ROLE_ADMIN),
        metadata=admin.md())
    await admin.stub.ListModels(admin_pb2.ListModelsRequest(), metadata=admin.md(second.key))
    await admin.stub.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=second.key_id), metadata=admin.md())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.stub.ListModels(admin_pb2.ListModelsRequest(), metadata=admin.md(second.key))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in (err.value.details() or "")


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


async def test_every_change_writes_an_audit_row_with_before_and_after(admin: Admin) -> None:
    s, md = admin.stub, admin.md()
    org = (await s.CreateOrg(admin_pb2.CreateOrgRequest(name="acme"), metadata=md)).org_id
    team = (await s.CreateTeam(admin_pb2.CreateTeamRequest(org_id=org, name="search"), metadata=md)).team_id
    key = await s.CreateKey(admin_pb2.CreateKeyRequest(org_id=org, team_id=team, name="ci",
                                                       role=admin_pb2.KEY_ROLE_MEMBER, allowed_models=["m-cheap"]),
                            metadata=md)
    for rpm in (10, 20):
        await s.SetLimits(admin_pb2.SetLimitsRequest(scope=common_pb2.LIMIT_SCOPE_TEAM, scope_id=team,
                                                     requests_per_minute=rpm, tokens_per_minute=1000), metadata=md)
    for daily in (1_000, 2_000):
        await s.SetBudget(admin_pb2.SetBudgetRequest(scope=common_pb2.LIMIT_SCOPE_ORG, scope_id=org,
                                                     daily_nano_usd=daily, monthly_nano_usd=10 * daily), metadata=md)
    for window in (1000, 2000):
        await s.RegisterModel(admin_pb2.RegisterModelRequest(model=admin_pb2.ModelInfo(
            name="m-new", provider="fake", inference_target="127.0.0.1:2", context_window=window,
            cost_tier=admin_pb2.COST_TIER_STRONG)), metadata=md)
    v1 = (await s.SetPrice(admin_pb2.SetPriceRequest(model="m-new", input_nano_usd_per_mtok=1,
                                                     output_nano_usd_per_mtok=2, cached_input_nano_usd_per_mtok=0),
                           metadata=md)).price_version
    later = datetime.now(UTC) + timedelta(days=1)
    v2 = (await s.SetPrice(admin_pb2.SetPriceRequest(model="m-new", input_nano_usd_per_mtok=3,
                                                     output_nano_usd_per_mtok=4, cached_input_nano_usd_per_mtok=1,
                                                     effective_from=_ts(later)), metadata=md)).price_version
    await s.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=key.key_id), metadata=md)

    events = list(reversed((await s.ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=100),
                                                    metadata=md)).events))
    mine = [e for e in events if e.actor_key_id == admin.admin_key_id]
    assert [e.action for e in mine] == ["create_org", "create_team", "create_key", "set_limits", "set_limits",
                                        "set_budget", "set_budget", "register_model", "register_model", "set_price",
                                        "set_price", "revoke_key"]

    def j(text: str) -> dict[str, object] | None:
        loaded: dict[str, object] | None = json.loads(text) if text else None
        return loaded

    by = {(e.action, i): e for i, e in enumerate(mine)}
    assert j(by["create_org", 0].before_json) is None and j(by["create_org", 0].after_json) == {"name": "acme"}
    created = j(by["create_key", 2].after_json)
    assert created is not None and created["team_id"] == team and created["role"] == "member"
    assert j(by["set_limits", 3].before_json) is None
    assert j(by["set_limits", 4].before_json)["requests_per_minute"] == 10  # type: ignore[index]
    assert j(by["set_limits", 4].after_json)["requests_per_minute"] == 20  # type: ignore[index]
    assert by["set_limits", 4].target == f"team:{team}"
    assert j(by["set_budget", 6].before_json)["daily_nano_usd"] == 1_000  # type: ignore[index]
    assert j(by["register_model", 8].before_json)["context_window"] == 1000  # type: ignore[index]
    assert j(by["register_model", 8].after_json)["context_window"] == 2000  # type: ignore[index]
    assert j(by["set_price", 9].before_json) is None
    assert j(by["set_price", 10].before_json)["price_version"] == v1  # type: ignore[index]
    assert j(by["set_price", 10].after_json)["price_version"] == v2  # type: ignore[index]
    assert j(by["revoke_key", 11].before_json)["revoked"] is False  # type: ignore[index]
    assert j(by["revoke_key", 11].after_json)["revoked"] is True  # type: ignore[index]
    # The audit trail never holds a secret.
    assert all(key.key not in e.before_json + e.after_json for e in events)
    # Filters.
    only = await s.ListAuditEvents(admin_pb2.ListAuditEventsRequest(target=key.key_id), metadata=md)
    assert [e.action for e in only.events] == ["revoke_key", "create_key"]
    revokes = await s.ListAuditEvents(admin_pb2.ListAuditEventsRequest(action="set_price"), metadata=md)
    assert len(revokes.events) == 2 + 1  # the two above and bootstrap's


async def test_history_tables_are_append_only(admin: Admin) -> None:
    async with admin.pool.acquire() as conn:
        for sql in ("UPDATE prices SET input_nano_usd_per_mtok = 0", "DELETE FROM prices",
                    "UPDATE audit_log SET after = NULL", "DELETE FROM audit_log"):
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(sql)


async def test_listing_rpcs(admin: Admin) -> None:
    s, md = admin.stub, admin.md()
    created = await s.CreateKey(admin_pb2.CreateKeyRequest(
        org_id=admin.org_id, team_id=admin.team_id, name="expiring", role=admin_pb2.KEY_ROLE_MEMBER,
        expires_at=_ts(datetime.now(UTC) + timedelta(days=7))), metadata=md)
    assert created.key.startswith("tg-") and created.hash_algorithm == "sha256"
    assert "256 bits" in created.hash_rationale
    keys = {k.key_id: k for k in (await s.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys}
    assert keys[created.key_id].HasField("expires_at") and not keys[created.key_id].HasField("revoked_at")
    assert all(created.key not in str(k) for k in keys.values())
    await s.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=created.key_id), metadata=md)
    keys = {k.key_id: k for k in (await s.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys}
    assert keys[created.key_id].revoked and keys[created.key_id].HasField("revoked_at")

    orgs = (await s.ListOrgs(admin_pb2.ListOrgsRequest(), metadata=md)).orgs
    assert [o.name for o in orgs] == ["default"]
    teams = (await s.ListTeams(admin_pb2.ListTeamsRequest(org_id=admin.org_id), metadata=md)).teams
    assert [(t.team_id, t.name) for t in teams] == [(admin.team_id, "default")]

    await s.SetLimits(admin_pb2.SetLimitsRequest(scope=common_pb2.LIMIT_SCOPE_KEY, scope_id="k1",
                                                 tokens_per_day=99), metadata=md)
    await s.SetBudget(admin_pb2.SetBudgetRequest(scope=common_pb2.LIMIT_SCOPE_GLOBAL, monthly_nano_usd=5),
                      metadata=md)
    limits = await s.ListLimits(admin_pb2.ListLimitsRequest(), metadata=md)
    assert [(x.scope, x.scope_id, x.tokens_per_day) for x in limits.limits] == [(common_pb2.LIMIT_SCOPE_KEY, "k1", 99)]
    assert [(b.scope, b.monthly_nano_usd) for b in limits.budgets] == [(common_pb2.LIMIT_SCOPE_GLOBAL, 5)]
    only_team = await s.ListLimits(admin_pb2.ListLimitsRequest(scope=common_pb2.LIMIT_SCOPE_TEAM), metadata=md)
    assert not only_team.limits and not only_team.budgets

    later = datetime.now(UTC) + timedelta(hours=2)
    await s.SetPrice(admin_pb2.SetPriceRequest(model="m-cheap", input_nano_usd_per_mtok=7, output_nano_usd_per_mtok=8,
                                               effective_from=_ts(later)), metadata=md)
    prices = (await s.ListPrices(admin_pb2.ListPricesRequest(model="m-cheap"), metadata=md)).prices
    assert [(p.input_nano_usd_per_mtok, p.output_nano_usd_per_mtok) for p in prices] == [(100, 200), (7, 8)]
    assert prices[0].price_version < prices[1].price_version
    assert prices[1].effective_from.ToDatetime(UTC) == later.replace(microsecond=later.microsecond)


async def test_bad_requests_are_invalid_argument_with_fields(admin: Admin) -> None:
    s, md = admin.stub, admin.md()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.RegisterModel(admin_pb2.RegisterModelRequest(model=admin_pb2.ModelInfo(name="auto")), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SetPrice(admin_pb2.SetPriceRequest(model="m-cheap", input_nano_usd_per_mtok=1,
                                                   effective_from=_ts(datetime.now(UTC) - timedelta(days=1))),
                         metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "past" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ListLimits(admin_pb2.ListLimitsRequest(scope=99), metadata=md)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_raw_keys_never_reach_the_database_errors_or_logs(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s, md = admin.stub, admin.md()
    created = await s.CreateKey(admin_pb2.CreateKeyRequest(org_id=admin.org_id, team_id=admin.team_id, name="x",
                                                           role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)
    secrets = [admin.admin_key, admin.member_key, created.key]
    messages = []
    for key in secrets:
        for call in (s.CreateOrg(admin_pb2.CreateOrgRequest(name="y"), metadata=admin.md(key)),
                     s.ListKeys(admin_pb2.ListKeysRequest(), metadata=admin.md(key + "x"))):
            try:
                await call
            except grpc.aio.AioRpcError as exc:
                messages.append(exc.details() or "")
    await s.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=created.key_id), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ListKeys(admin_pb2.ListKeysRequest(), metadata=admin.md(created.key))
    messages.append(err.value.details() or "")
    async with admin.pool.acquire() as conn:
        tables = [r["tablename"]
                  for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        dump = ""
        for t in tables:
            dump += "\n".join(r["j"] for r in await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{t}" t'))
    assert "api_keys" in tables and "audit_log" in tables
    for key in secrets:
        body = key[len("tg-"):]
        assert body not in dump, "a raw key is stored in the database"
        assert all(body not in m for m in messages), "a raw key is echoed in an error message"
        assert body not in caplog.text, "a raw key is logged"
