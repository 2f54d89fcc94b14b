"""Issue 14, AdminService over real gRPC, PostgreSQL and Redis: every string, timestamp and number is
checked up front. Before, a NUL in a name, a Timestamp past year 9999 (or with nanos out of range) or a
number past its column type reached PostgreSQL or datetime and came back as INTERNAL; domain refusals
came back as INVALID_ARGUMENT without a field."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.grpc_errors import status_proto_from_rpc
from libs.grpc_server import GrpcServer, ServiceBinding
from services.router import limits as lim
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import DefaultModel, apply_migrations, bootstrap
from services.router.control.experiments import ExperimentStore
from services.router.control.keys import RevocationBus
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.pipeline.authenticate import Authenticator
from services.router.settings import RouterSettings


@dataclass
class Admin:
    stub: admin_pb2_grpc.AdminServiceStub
    pool: asyncpg.Pool
    md: tuple[tuple[str, str], ...]
    org_id: str
    team_id: str


@pytest.fixture
async def admin(clean_env: None, database_url: str, redis_url: str, redis_prefix: str) -> AsyncIterator[Admin]:
    await apply_migrations(database_url)
    pool = await create_pool(database_url)
    client = redis.Redis.from_url(redis_url)
    admin_key = await bootstrap(pool, [DefaultModel("m-cheap", "fake", "127.0.0.1:1", 8192, "cheap", 100, 200, 50)])
    assert admin_key is not None
    control = ControlPlane(pool, RevocationBus(client, redis_prefix))
    registry = Registry(pool, 60)
    await registry.load()
    [listing] = await control.list_keys("", "")
    servicer = AdminServicer(control, Authenticator(control, cache_ttl_s=1.0), registry,
                             experiments=ExperimentStore(pool))
    server = GrpcServer(RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url),
                        [ServiceBinding("tollgate.router.v1.AdminService",
                                        lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, s))])
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        p = listing.record.principal
        yield Admin(admin_pb2_grpc.AdminServiceStub(channel), pool, (("authorization", f"Bearer {admin_key}"),),
                    p.org_id, p.team_id)
    finally:
        await channel.close()
        await server.stop(0)
        await client.aclose()
        await pool.close()


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _future(days: int = 1) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(datetime.now(UTC) + timedelta(days=days))
    return ts


YEAR_10000 = 253_402_300_800
BEFORE_YEAR_1 = -62_135_596_801
ORG, TEAM = "{org}", "{team}"  # replaced by the fixture's ids


def _model(**kw: Any) -> admin_pb2.ModelInfo:
    base: dict[str, Any] = dict(name="m-new", provider="fake", inference_target="127.0.0.1:1", context_window=8192,
                                cost_tier=admin_pb2.COST_TIER_CHEAP)
    base.update(kw)
    return admin_pb2.ModelInfo(**base)


def _variants(**kw: Any) -> list[admin_pb2.ExperimentVariant]:
    return [admin_pb2.ExperimentVariant(name="a", model="m-cheap", weight=1.0),
            admin_pb2.ExperimentVariant(**{"name": "b", "model": "m-cheap", "weight": 1.0, **kw})]


def _key(**kw: Any) -> admin_pb2.CreateKeyRequest:
    base: dict[str, Any] = dict(org_id=ORG, team_id=TEAM, name="k", role=admin_pb2.KEY_ROLE_MEMBER)
    base.update(kw)
    return admin_pb2.CreateKeyRequest(**base)


GLOBAL = common_pb2.LIMIT_SCOPE_GLOBAL
ORG_SCOPE = common_pb2.LIMIT_SCOPE_ORG

# (RPC, request, the field the violation must name)
CASES: dict[str, tuple[str, Any, str]] = {
    "org name with NUL": ("CreateOrg", admin_pb2.CreateOrgRequest(name="acme\x00"), "name"),
    "org name too long": ("CreateOrg", admin_pb2.CreateOrgRequest(name="a" * (lim.MAX_DISPLAY_NAME_CHARS + 1)), "name"),
    "team name with NUL": ("CreateTeam", admin_pb2.CreateTeamRequest(org_id=ORG, name="t\x00"), "name"),
    "team org_id with NUL": ("CreateTeam", admin_pb2.CreateTeamRequest(org_id="o\x00", name="t"), "org_id"),
    "key name with NUL": ("CreateKey", _key(name="k\x00"), "name"),
    "allowed model with NUL": ("CreateKey", _key(allowed_models=["m\x00"]), "allowed_models[0]"),
    "expires_at after year 9999": ("CreateKey", _key(expires_at=_ts(YEAR_10000)), "expires_at"),
    "expires_at before year 1": ("CreateKey", _key(expires_at=_ts(BEFORE_YEAR_1)), "expires_at"),
    "expires_at nanos negative": ("CreateKey", _key(expires_at=_ts(2_000_000_000, -1)), "expires_at"),
    "expires_at nanos too big": ("CreateKey", _key(expires_at=_ts(2_000_000_000, 1_000_000_000)), "expires_at"),
    "expires_at in the past": ("CreateKey", _key(expires_at=_ts(0)), "expires_at"),
    "revoke key_id with NUL": ("RevokeKey", admin_pb2.RevokeKeyRequest(key_id="k\x00"), "key_id"),
    "list keys org_id with NUL": ("ListKeys", admin_pb2.ListKeysRequest(org_id="o\x00"), "org_id"),
    "limits scope_id with NUL": ("SetLimits", admin_pb2.SetLimitsRequest(scope=ORG_SCOPE, scope_id="o\x00"),
                                 "scope_id"),
    "limits past bigint": ("SetLimits", admin_pb2.SetLimitsRequest(scope=GLOBAL, requests_per_minute=2**64 - 1),
                           "requests_per_minute"),
    "budget scope_id with NUL": ("SetBudget", admin_pb2.SetBudgetRequest(scope=ORG_SCOPE, scope_id="o\x00"),
                                 "scope_id"),
    "budget for a client ip": ("SetBudget", admin_pb2.SetBudgetRequest(
        scope=common_pb2.LIMIT_SCOPE_CLIENT_IP, scope_id="10.0.0.1"), "scope"),
    "model provider with NUL": ("RegisterModel", admin_pb2.RegisterModelRequest(model=_model(provider="f\x00")),
                                "model.provider"),
    "model name with NUL": ("RegisterModel", admin_pb2.RegisterModelRequest(model=_model(name="m\x00")),
                            "model.name"),
    "model target with NUL": ("RegisterModel", admin_pb2.RegisterModelRequest(
        model=_model(inference_target="h:1\x00")), "model.inference_target"),
    "context window past integer": ("RegisterModel", admin_pb2.RegisterModelRequest(
        model=_model(context_window=2**32 - 1)), "model.context_window"),
    "price model with NUL": ("SetPrice", admin_pb2.SetPriceRequest(model="m-cheap\x00"), "model"),
    "price effective_from after 9999": ("SetPrice", admin_pb2.SetPriceRequest(
        model="m-cheap", effective_from=_ts(2**62)), "effective_from"),
    "price effective_from nanos": ("SetPrice", admin_pb2.SetPriceRequest(
        model="m-cheap", effective_from=_ts(YEAR_10000 - 100, -5)), "effective_from"),
    "price that would overflow the ledger": ("SetPrice", admin_pb2.SetPriceRequest(
        model="m-cheap", output_nano_usd_per_mtok=2**62), "output_nano_usd_per_mtok"),
    "report start after 9999": ("GetUsageReport", admin_pb2.GetUsageReportRequest(
        start_time=_ts(YEAR_10000), end_time=_ts(YEAR_10000 + 10)), "start_time"),
    "report end nanos": ("GetUsageReport", admin_pb2.GetUsageReportRequest(
        start_time=_ts(0), end_time=_ts(10, 2**31 - 1)), "end_time"),
    "report end before start": ("GetUsageReport", admin_pb2.GetUsageReportRequest(
        start_time=_ts(100), end_time=_ts(10)), "end_time"),
    "audit target with NUL": ("ListAuditEvents", admin_pb2.ListAuditEventsRequest(target="t\x00"), "target"),
    "audit action with NUL": ("ListAuditEvents", admin_pb2.ListAuditEventsRequest(action="a\x00"), "action"),
    "teams org_id with NUL": ("ListTeams", admin_pb2.ListTeamsRequest(org_id="o\x00"), "org_id"),
    "limits listing scope_id with NUL": ("ListLimits", admin_pb2.ListLimitsRequest(scope_id="o\x00"), "scope_id"),
    "prices model with NUL": ("ListPrices", admin_pb2.ListPricesRequest(model="m\x00"), "model"),
    "experiment name with a trailing newline": ("CreateExperiment", admin_pb2.CreateExperimentRequest(
        name="exp\n", model="m-cheap", variants=_variants()), "name"),
    "experiment name with NUL": ("CreateExperiment", admin_pb2.CreateExperimentRequest(
        name="exp\x00", model="m-cheap", variants=_variants()), "name"),
    "variant weight NaN": ("CreateExperiment", admin_pb2.CreateExperimentRequest(
        name="exp", model="m-cheap", variants=_variants(weight=float("nan"))), "variants[1].weight"),
    "end experiment name with NUL": ("EndExperiment", admin_pb2.EndExperimentRequest(name="e\x00"), "name"),
    "report experiment name with NUL": ("GetExperimentReport", admin_pb2.GetExperimentReportRequest(name="e\x00"),
                                        "name"),
    "report alpha NaN": ("GetExperimentReport", admin_pb2.GetExperimentReportRequest(
        name="e", alpha=float("nan")), "alpha"),
}


def _fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = status_proto_from_rpc(err)
    assert status is not None, err.details()
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [v.field for v in bad.field_violations]
    return out


def _fill(request: Any, org_id: str, team_id: str) -> Any:
    for field in ("org_id", "team_id"):
        if hasattr(request, field) and getattr(request, field) in (ORG, TEAM):
            setattr(request, field, org_id if getattr(request, field) == ORG else team_id)
    return request


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_admin_input_is_invalid_argument_naming_the_field(admin: Admin, case: str) -> None:
    method, request, field = CASES[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(admin.stub, method)(_fill(request, admin.org_id, admin.team_id), metadata=admin.md, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.value.code(), err.value.details())
    assert field in _fields(err.value), (_fields(err.value), err.value.details())


async def test_the_extremes_that_are_allowed_are_stored(admin: Admin) -> None:
    s, md = admin.stub, admin.md
    await s.RegisterModel(admin_pb2.RegisterModelRequest(model=_model(context_window=lim.MAX_CONTEXT_WINDOW)),
                          metadata=md)
    await s.SetLimits(admin_pb2.SetLimitsRequest(scope=GLOBAL, requests_per_minute=lim.MAX_LIMIT_VALUE), metadata=md)
    await s.CreateKey(_fill(_key(expires_at=_ts(lim_max := 253_402_300_799, 999_999_999)), admin.org_id,
                            admin.team_id), metadata=md)
    report = await s.GetUsageReport(admin_pb2.GetUsageReportRequest(start_time=_ts(-62_135_596_800),
                                                                    end_time=_ts(lim_max)), metadata=md)
    assert list(report.rows) == [] or report.rows[0].requests == 0
    await s.CreateExperiment(admin_pb2.CreateExperimentRequest(name="exp.1", model="m-cheap", variants=_variants()),
                             metadata=md)
