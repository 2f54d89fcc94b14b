"""Fuzz every RateLimitService RPC through a running server (real Redis and PostgreSQL).

Each RPC gets ``FUZZ_EXAMPLES`` requests: anything its input type can hold, and valid requests with
hostile fields merged in (so the fuzzer also reaches the Lua scripts behind validation). None may be
answered INTERNAL/UNKNOWN/DATA_LOSS, an INVALID_ARGUMENT must name its field, and the server must
still be SERVING after each one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2

from libs.grpc_server import GrpcServer
from libs.pg_migrations import migrate
from services.ratelimit.server import REDIS_HEALTH, build_app
from services.ratelimit.settings import RateLimitSettings
from tests.integration.ratelimit.ratelimit_support import MIGRATIONS
from tests.support import infra
from tests.support.fuzz import (
    ServerErrorLog,
    fuzz_example,
    fuzz_settings,
    unary_method,
)

pytestmark = pytest.mark.fuzz

SERVICE = ratelimit_pb2.DESCRIPTOR.services_by_name["RateLimitService"]

_SUBJECT = ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id="o1", team_id="t1", key_id="k1"),
                                 client_ip="10.0.0.1")

# Valid requests per RPC, the bases hostile fields are merged into. A new RPC without an entry fails
# test_every_rpc_is_fuzzed (and its fuzz test).
VALID: dict[str, list[Message]] = {
    "Reserve": [ratelimit_pb2.ReserveRequest(subject=_SUBJECT, request_id="r1", estimated_tokens=100,
                                             estimated_cost_nano_usd=1000, ttl=duration_pb2.Duration(seconds=30))],
    "Commit": [ratelimit_pb2.CommitRequest(reservation_id="0123456789abcdef", actual_tokens=5,
                                           actual_cost_nano_usd=10)],
    "Release": [ratelimit_pb2.ReleaseRequest(reservation_id="0123456789abcdef")],
    "GetUsage": [ratelimit_pb2.GetUsageRequest(subject=_SUBJECT)],
    "ReconcileSpend": [ratelimit_pb2.ReconcileSpendRequest(
        scope=common_pb2.LIMIT_SCOPE_ORG, scope_id="o1", kind=ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD,
        window_time=timestamp_pb2.Timestamp(seconds=1_800_000_000), ledger_spent_nano_usd=5)],
    "Charge": [ratelimit_pb2.ChargeRequest(subject=_SUBJECT, charge_id="c1", requests=1, tokens=100,
                                           cost_nano_usd=1000, used_at=timestamp_pb2.Timestamp(seconds=1_800_000_000)),
               ratelimit_pb2.ChargeRequest(subject=_SUBJECT, charge_id="c2", requests=1, tokens=100)],
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    prefix = f"tgtest:{infra.unique_name('fuzzrl')}:"
    db_name = infra.unique_name("tollgate_fuzz")
    database_url = await infra.create_database(db_name)
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, MIGRATIONS)
        # A limit and a budget, so reservations run the bucket and budget paths of the scripts.
        await conn.execute("INSERT INTO limits (scope, scope_id, requests_per_minute, tokens_per_minute,"
                           " tokens_per_day) VALUES ('org', 'o1', 1000000, 1000000000, 1000000000)")
        await conn.execute("INSERT INTO budgets (scope, scope_id, daily_nano_usd, monthly_nano_usd)"
                           " VALUES ('org', 'o1', 1000000000000, 0)")
    finally:
        await conn.close()
    settings = RateLimitSettings(host="127.0.0.1", port=0, redis_url=infra.REDIS_URL, redis_prefix=prefix,
                                 database_url=database_url, grace_period_s=1)
    app = await build_app(settings)
    server = GrpcServer(settings, app.bindings)
    port = await server.start()
    await app.watch_health(server.health)
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    # Live reservations, so Commit and Release are fuzzed against real ones too (not only NOT_FOUND).
    reserve = unary_method(ch, SERVICE, "Reserve")
    for i in range(32):
        reply = await reserve(ratelimit_pb2.ReserveRequest(subject=_SUBJECT, request_id=f"fuzz-{i}",
                                                           estimated_tokens=100, estimated_cost_nano_usd=1000))
        rid = reply.reservation_id  # type: ignore[attr-defined]
        if i % 2:
            VALID["Commit"].append(ratelimit_pb2.CommitRequest(reservation_id=rid, actual_tokens=50,
                                                               actual_cost_nano_usd=500))
        else:
            VALID["Release"].append(ratelimit_pb2.ReleaseRequest(reservation_id=rid))
    try:
        yield ch
    finally:
        await ch.close()
        await server.stop(0)
        await app.close()
        await infra.delete_redis_prefix(infra.REDIS_URL, prefix)
        await infra.drop_database(db_name)


def test_every_rpc_is_fuzzed() -> None:
    assert set(VALID) == {m.name for m in SERVICE.methods}


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
@fuzz_settings()
@given(data=st.data())
async def test_fuzz_rpc(channel: grpc.aio.Channel, server_errors: ServerErrorLog, method_name: str,
                        data: st.DataObject) -> None:
    # A request must never make the limiter think Redis failed (and fall back to the local limiter).
    await fuzz_example(channel, SERVICE, method_name, VALID[method_name], data, server_errors, health=(REDIS_HEALTH,))
