"""Fuzz every RPC of RouterService and AdminService through a running router (issue 14).

One router per module, built by ``services.router.server.build`` (the production wiring: real
PostgreSQL, Redis, ledger writer, revocation listener) and served on a loopback port, in front of a real
inference service that talks HTTP to the fake provider. Cache, ratelimit and retrieval point at a closed
port: the router fails open around them, which is part of what is under test.

The RPCs come from the service descriptors, so a new RPC is fuzzed without anyone listing it. For each,
``TOLLGATE_FUZZ_EXAMPLES`` requests (1,000 by default) drawn by ``message_strategy``; Generate and
GenerateStream also get near-valid requests (a registered model, one user message, the rest fuzzed) so that
labels, user ids, stop sequences and the like reach the ledger. Most calls carry the admin key, some none,
a malformed or an unknown one. Every answer must be typed (never INTERNAL, UNKNOWN or DATA_LOSS; an
INVALID_ARGUMENT names the field), the server must stay SERVING, and at the end no usage event may be in
the dead-letter stream: every served request's ledger row was accepted by PostgreSQL.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis.asyncio as redis
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from hypothesis import given
from hypothesis import strategies as st
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, router_pb2

from libs.grpc_server import GrpcServer
from services.router.control.bootstrap import DefaultModel, apply_migrations, bootstrap
from services.router.control.plane import ControlPlane
from services.router.db import create_pool
from services.router.ledger.events import GUARD_LABEL
from services.router.server import build
from services.router.settings import RouterSettings
from tests.support import infra
from tests.support.fuzz import (
    assert_serving,
    call_stream,
    call_unary,
    fuzz_settings,
    request_strategy,
    unary_method,
    unary_stream_method,
)
from tests.support.inference import inference_replica
from tests.support.proto_strategies import message_strategy
from tools.fake_provider import FakeProvider

SERVICES: tuple[ServiceDescriptor, ...] = (router_pb2.DESCRIPTOR.services_by_name["RouterService"],
                                           admin_pb2.DESCRIPTOR.services_by_name["AdminService"])
# RouterService first: AdminService examples register models and prices that change what Generate meets.
METHODS: list[tuple[ServiceDescriptor, MethodDescriptor]] = [(s, m) for s in SERVICES for m in s.methods]
MODEL = "m"
CLOSED = "127.0.0.1:1"  # nothing listens: cache, ratelimit and retrieval are down

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(900), pytest.mark.asyncio(loop_scope="module")]


@dataclass
class Mesh:
    channel: grpc.aio.Channel
    admin_key: str
    member_key: str
    redis: redis.Redis
    pool: asyncpg.Pool
    stream: str
    org_id: str
    team_id: str
    data_dir: Path
    codes: dict[str, collections.Counter[str]] = field(default_factory=dict)
    strategies: dict[str, st.SearchStrategy[Message]] = field(default_factory=dict)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    db_name = infra.unique_name("tollgate_fuzz")
    database_url = await infra.create_database(db_name)
    prefix = f"tgtest:{infra.unique_name('fuzz')}:"
    async with AsyncExitStack() as stack:
        stack.push_async_callback(infra.drop_database, db_name)
        stack.push_async_callback(infra.delete_redis_prefix, infra.REDIS_URL, prefix)
        provider = await stack.enter_async_context(FakeProvider())
        target = await stack.enter_async_context(inference_replica(provider, MODEL))
        await apply_migrations(database_url)
        pool = await create_pool(database_url)
        stack.push_async_callback(pool.close)
        admin_key = await bootstrap(pool, [DefaultModel(MODEL, "fake", target, 8192, "cheap", 100, 200, 50)])
        assert admin_key is not None
        [listing] = await ControlPlane(pool).list_keys("", "")
        p = listing.record.principal
        member = await ControlPlane(pool).create_key("fuzz", org_id=p.org_id, team_id=p.team_id, name="member",
                                                     role="member", allowed_models=[], expires_at=None)
        data_dir = tmp_path_factory.mktemp("router-data")
        settings = RouterSettings(
            host="127.0.0.1", port=0, database_url=database_url, redis_url=infra.REDIS_URL, redis_prefix=prefix,
            cache_target=CLOSED, ratelimit_target=CLOSED, retrieval_target=CLOSED,
            data_dir=str(data_dir),
            # Fuzzed requests that fail must not move the whole gateway to cache-only: the near-valid ones
            # should keep reaching a backend and the ledger.
            degradation_enabled=False, default_timeout_s=10)
        bindings, close = await build(settings)
        stack.push_async_callback(close)
        server = GrpcServer(settings, bindings)
        port = await server.start()
        stack.push_async_callback(server.stop, 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stack.push_async_callback(channel.close)
        client = redis.Redis.from_url(infra.REDIS_URL)
        stack.push_async_callback(client.aclose)
        mesh = Mesh(channel, admin_key, member.secret, client, pool, f"{prefix}{settings.usage_stream}", p.org_id,
                    p.team_id, data_dir)
        yield mesh
        for name, counts in sorted(mesh.codes.items()):
            print(f"{name}: {dict(counts)}")


AUTH = st.sampled_from(["admin"] * 7 + ["member", "none", "malformed", "unknown"])


def _metadata(mesh: Mesh, kind: str, token: str) -> tuple[tuple[str, str], ...]:
    if kind == "admin":
        return (("authorization", f"Bearer {mesh.admin_key}"),)
    if kind == "member":
        return (("authorization", f"Bearer {mesh.member_key}"),)
    if kind == "malformed":
        return (("authorization", f"Basic {token}"),)
    if kind == "unknown":
        return (("authorization", f"Bearer tg-{token}"),)
    return ()


def _near_valid(request: Message, auto: bool, keep_messages: bool) -> Message:
    """A fuzzed generation with a registered model, one sane message and a short answer; the rest as drawn."""
    inp = request.input  # type: ignore[attr-defined]
    inp.model = "auto" if auto else MODEL
    del inp.fallback_models[:]
    if not keep_messages or not inp.messages:
        del inp.messages[:]
        inp.messages.add(role=common_pb2.MESSAGE_ROLE_USER, content="What is the capital of France?")
    inp.params.max_output_tokens = min(inp.params.max_output_tokens, 16) or 8
    inp.retrieval.required = False
    return request


def _bases(mesh: Mesh, method: MethodDescriptor) -> list[Message]:
    """Valid requests that fuzzed fields are merged into, so examples get past the first check to the domain
    code and PostgreSQL. None for RevokeKey: a merged key id could revoke the keys the test runs on."""
    now = int(time.time())
    variants = [admin_pb2.ExperimentVariant(name="a", model=MODEL, weight=1),
                admin_pb2.ExperimentVariant(name="b", model=MODEL, weight=1)]
    org = common_pb2.LIMIT_SCOPE_ORG
    bases: dict[str, list[Message]] = {
        "CreateOrg": [admin_pb2.CreateOrgRequest(name="fuzz-org")],
        "CreateTeam": [admin_pb2.CreateTeamRequest(org_id=mesh.org_id, name="fuzz-team")],
        "CreateKey": [admin_pb2.CreateKeyRequest(org_id=mesh.org_id, team_id=mesh.team_id, name="fuzz-key",
                                                 role=admin_pb2.KEY_ROLE_MEMBER)],
        "SetLimits": [admin_pb2.SetLimitsRequest(scope=org, scope_id=mesh.org_id, requests_per_minute=1000)],
        "SetBudget": [admin_pb2.SetBudgetRequest(scope=org, scope_id=mesh.org_id, daily_nano_usd=10**12)],
        "RegisterModel": [admin_pb2.RegisterModelRequest(model=admin_pb2.ModelInfo(
            name="fuzz-model", provider="fake", inference_target=CLOSED, context_window=8192,
            cost_tier=admin_pb2.COST_TIER_STRONG))],
        "SetPrice": [admin_pb2.SetPriceRequest(model=MODEL, input_nano_usd_per_mtok=100,
                                               output_nano_usd_per_mtok=200)],
        "GetUsageReport": [admin_pb2.GetUsageReportRequest(
            start_time={"seconds": now - 86_400}, end_time={"seconds": now + 86_400},
            group_by=[admin_pb2.USAGE_GROUP_BY_MODEL, admin_pb2.USAGE_GROUP_BY_DAY])],
        "CreateExperiment": [admin_pb2.CreateExperimentRequest(name="fuzz-exp", model=MODEL, variants=variants)],
        "GetExperimentReport": [admin_pb2.GetExperimentReportRequest(name="fuzz-exp")],
        "SubmitFeedback": [router_pb2.SubmitFeedbackRequest(request_id="fuzz-request",
                                                            score=router_pb2.FEEDBACK_SCORE_UP)],
    }
    return bases.get(method.name, [])


def _requests(mesh: Mesh, method: MethodDescriptor) -> st.SearchStrategy[Message]:
    if method.full_name not in mesh.strategies:
        fuzzed = request_strategy(method, _bases(mesh, method))
        if set(method.input_type.fields_by_name) == {"input"}:
            fuzzed = st.one_of(fuzzed, st.builds(_near_valid, message_strategy(method.input_type), st.booleans(),
                                                 st.booleans()))
        mesh.strategies[method.full_name] = fuzzed
    return mesh.strategies[method.full_name]


async def test_every_rpc_of_both_services_is_fuzzed() -> None:
    # The parametrization below reads the descriptors; this fails if an RPC's shape has no fuzz driver
    # (a client-streaming RPC would need one) or if a service lost its RPCs.
    assert {m.full_name for _, m in METHODS} == {m.full_name for s in SERVICES for m in s.methods}
    assert len(METHODS) >= 4 + 20
    for _, method in METHODS:
        assert not method.client_streaming, f"{method.full_name}: client streaming has no fuzz driver"


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[m.full_name for _, m in METHODS])
@fuzz_settings()
@given(data=st.data())
async def test_fuzz_rpc(mesh: Mesh, service: ServiceDescriptor, method: MethodDescriptor, data: st.DataObject) -> None:
    request = data.draw(_requests(mesh, method), label="request")
    auth = data.draw(AUTH, label="auth")
    token = data.draw(st.text(alphabet="abcdefghij0123456789", max_size=12), label="token")
    where = method.full_name  # hypothesis reports the drawn request; its repr can be megabytes
    md = _metadata(mesh, auth, token)
    if method.server_streaming:
        code = await call_stream(unary_stream_method(mesh.channel, service, method.name), request, where,
                                 metadata=md)
    else:
        code = await call_unary(unary_method(mesh.channel, service, method.name), request, where, metadata=md)
    mesh.codes.setdefault(method.full_name, collections.Counter())[f"{auth}:{code.name}"] += 1
    # PostgreSQL and Redis are up: an admin call that answers UNAVAILABLE failed on the caller's input
    # (Redis refusing a malformed stream id, say) and should have said INVALID_ARGUMENT.
    assert not (service.name == "AdminService" and code == grpc.StatusCode.UNAVAILABLE), where


@pytest.mark.parametrize("service", SERVICES, ids=[s.full_name for s in SERVICES])
async def test_still_serving_after_the_fuzzing(mesh: Mesh, service: ServiceDescriptor) -> None:
    await assert_serving(mesh.channel)
    await assert_serving(mesh.channel, service.full_name)


async def test_no_usage_event_was_dead_lettered(mesh: Mesh) -> None:
    # Let the ledger writer drain the stream, then: nothing refused, and the served requests are in the ledger.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if await mesh.redis.xlen(mesh.stream) == 0:
            break
        await asyncio.sleep(0.2)
    assert await mesh.redis.xlen(mesh.stream) == 0, "the ledger writer did not drain the usage stream"
    dead = await mesh.redis.xrange(f"{mesh.stream}:dead", count=5)
    assert await mesh.redis.xlen(f"{mesh.stream}:dead") == 0, f"usage events dead-lettered: {dead}"
    async with mesh.pool.acquire() as conn:
        rows = await conn.fetchval("SELECT count(*) FROM usage_ledger")
        # The writer stores what the columns cannot hold clamped and labelled rather than dead-lettered: a row
        # with that label means the router's validation let such a value through.
        guarded = await conn.fetchval("SELECT count(*) FROM usage_ledger WHERE labels ? $1", GUARD_LABEL)
    assert guarded == 0, f"{guarded} ledger rows needed the writer's guard (validation gap at the router)"
    served = sum(n for name, c in mesh.codes.items() if name.endswith(("Generate", "GenerateStream"))
                 for outcome, n in c.items() if outcome.endswith(":OK"))
    assert rows >= served > 0, (rows, served)
    assert not list(mesh.data_dir.rglob("usage-spool-*.jsonl")), "usage events were spooled (Redis unreachable?)"
