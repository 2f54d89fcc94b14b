"""Helpers shared by the ratelimit integration tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

from libs.grpc_errors import status_proto_from_rpc
from services.ratelimit.server import RateLimitApp
from services.ratelimit.settings import RateLimitSettings

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "router" / "migrations"


@dataclass
class Running:
    stub: ratelimit_pb2_grpc.RateLimitServiceStub
    db: asyncpg.Pool
    settings: RateLimitSettings
    app: RateLimitApp
    health: health.aio.HealthServicer
    channel: grpc.aio.Channel


def subject(key: str = "k1", team: str = "t1", org: str = "o1", ip: str = "") -> ratelimit_pb2.Subject:
    return ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id=org, team_id=team, key_id=key), client_ip=ip)


def reserve_req(tokens: int, request_id: str = "", cost: int = 0, **kwargs: Any) -> ratelimit_pb2.ReserveRequest:
    # A fresh request id per call: the same id would be answered with the same reservation.
    return ratelimit_pb2.ReserveRequest(subject=subject(**kwargs), request_id=request_id or uuid.uuid4().hex,
                                        estimated_tokens=tokens, estimated_cost_nano_usd=cost)


def detail(status: status_pb2.Status, kind: Any) -> Any:
    for d in status.details:
        if d.Is(kind.DESCRIPTOR):
            msg = kind()
            d.Unpack(msg)
            return msg
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {status}")


async def rpc_error(call: Any) -> tuple[grpc.aio.AioRpcError, status_pb2.Status]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    status = status_proto_from_rpc(info.value)
    assert status is not None
    return info.value, status


async def set_limit(svc: Running | asyncpg.Pool, scope: str, scope_id: str, rpm: int = 0, tpm: int = 0,
                    tpd: int = 0) -> None:
    db = svc.db if isinstance(svc, Running) else svc
    await db.execute(
        "INSERT INTO limits (scope, scope_id, requests_per_minute, tokens_per_minute, tokens_per_day)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, scope_id) DO UPDATE SET"
        " requests_per_minute = $3, tokens_per_minute = $4, tokens_per_day = $5, updated_at = now()",
        scope, scope_id, rpm, tpm, tpd)


async def set_budget(svc: Running | asyncpg.Pool, scope: str, scope_id: str, daily: int = 0,
                     monthly: int = 0) -> None:
    db = svc.db if isinstance(svc, Running) else svc
    await db.execute(
        "INSERT INTO budgets (scope, scope_id, daily_nano_usd, monthly_nano_usd) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (scope, scope_id) DO UPDATE SET daily_nano_usd = $3, monthly_nano_usd = $4, updated_at = now()",
        scope, scope_id, daily, monthly)


async def wait_for_limit(svc: Running, key: str, kind: int, limit: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        usage = await svc.stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject(key)))
        if any(u.kind == kind and u.limit == limit for u in usage.usages):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"limit {limit} not picked up within {timeout_s}s")
