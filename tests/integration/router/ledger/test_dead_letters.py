"""Ledger dead letters are never silent (issue 14), against real Redis, PostgreSQL and gRPC:
- the writer sets a refused or malformed entry aside with the reason (no values), never acknowledges one
  silently, and stores values the column types could refuse instead of refusing them;
- AdminService ListDeadLetters / ReplayDeadLetters and `tollgate dead-letters list|replay` (the real entry
  point, as a process): a repaired row lands in the ledger exactly once, a refused one stays with the new
  reason;
- the router's health service reports `tollgate.router.v1.Ledger` NOT_SERVING while any exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.grpc_server import GrpcServer, ServiceBinding
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import DefaultModel, bootstrap
from services.router.control.keys import RevocationBus
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.ledger.dead_letters import DeadLetterMonitor, DeadLetterStore, ReplayOutcome
from services.router.ledger.events import INT8, UsageEvent
from services.router.ledger.health import LEDGER_HEALTH_SERVICE, LedgerHealth
from services.router.ledger.spool import UsageRecorder
from services.router.ledger.writer import GROUP, LedgerWriter
from services.router.pipeline.authenticate import Authenticator
from services.router.settings import RouterSettings
from tests.support.usage import usage_event

ROOT = Path(__file__).resolve().parents[4]
SECRET = "s3cr3t-value-9931"  # a value that must never show up in a reason


def _event(request_id: str, cost: int = 1_000, **changes: object) -> UsageEvent:
    return usage_event(request_id, **{"cost_nano_usd": cost, "labels": {"team": "search"}, **changes})


async def _refuse_negative_costs(pool: asyncpg.Pool) -> None:
    # A ledger constraint the router's events can break: stands for any value PostgreSQL refuses.
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE usage_ledger ADD CONSTRAINT test_cost_not_negative CHECK (cost_nano_usd >= 0)")


async def _ledger(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    async with pool.acquire() as conn:
        return {r["request_id"]: r for r in await conn.fetch("SELECT * FROM usage_ledger")}


async def _dead(client: redis.Redis, stream: str) -> list[dict[str, str]]:
    entries: Any = await client.xrange(f"{stream}:dead")
    return [{k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
            for _, fields in entries]


async def _pending_empty(client: redis.Redis, stream: str) -> bool:
    return await client.xlen(stream) == 0 and (await client.xpending(stream, GROUP))["pending"] == 0


async def test_refused_and_malformed_entries_are_set_aside_with_a_reason_and_no_values(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    await _refuse_negative_costs(pool)
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    recorder = UsageRecorder(client, stream, tmp_path)
    await recorder.record(_event("good-1"))
    await recorder.record(_event("negative", cost=-5))  # refused by the CHECK constraint
    await recorder.record(_event(f"nul\x00{SECRET}"))  # a request id PostgreSQL cannot store
    wrong_type = json.loads(_event("wrong-type").to_json()) | {"input_tokens": SECRET}
    await client.xadd(stream, {"e": json.dumps(wrong_type)})
    await client.xadd(stream, {"e": "{not json " + SECRET})
    await recorder.record(_event("good-2"))
    await writer.drain_once()

    assert sorted(await _ledger(pool)) == ["good-1", "good-2"]
    assert await _pending_empty(client, stream)
    dead = {d["request_id"]: d for d in await _dead(client, stream)}
    assert set(dead) == {"negative", f"nul\x00{SECRET}", "wrong-type", ""}
    assert dead["negative"]["reason"].startswith("CheckViolationError [23514]")
    assert dead[f"nul\x00{SECRET}"]["reason"].startswith("CharacterNotInRepertoireError [22021]")
    assert dead["wrong-type"]["reason"].startswith("DataError [22000] column input_tokens:")
    assert dead[""]["reason"].startswith("malformed: not JSON")
    for d in dead.values():
        assert SECRET not in d["reason"], d["reason"]
        assert d["id"] and datetime.fromisoformat(d["at"])  # where it came from, when
        assert d["e"]  # the event itself is kept for the operator


async def test_an_entry_without_an_event_is_set_aside_not_acknowledged_silently(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str) -> None:
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    await client.xadd(stream, {"event": _event("r1").to_json()})  # a producer that named the field wrongly
    await writer.drain_once()
    assert await _pending_empty(client, stream)
    [dead] = await _dead(client, stream)
    assert dead["reason"] == "malformed: no 'e' field"


async def test_values_the_ledger_columns_cannot_hold_are_stored_not_refused(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    # integer columns (tokens, latency) hold 2^31 - 1, bigint (nano-USD) 2^63 - 1; text and jsonb refuse NUL.
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    recorder = UsageRecorder(client, stream, tmp_path)
    await recorder.record(_event("huge", cost=2**70, output_tokens=2**40, latency_ms=2**33, model="m\x00x",
                                 labels={"team": "a\x00b", "k\x00": "v"}))
    await recorder.record(_event("negative-overflow", input_tokens=-(2**40), saved_nano_usd=-(2**64)))
    await writer.drain_once()
    assert await client.xlen(f"{stream}:dead") == 0
    rows = await _ledger(pool)
    huge = rows["huge"]
    assert (huge["cost_nano_usd"], huge["output_tokens"], huge["latency_ms"]) == (INT8[1], 2**31 - 1, 2**31 - 1)
    assert huge["model"] == "m\ufffdx"
    labels = json.loads(huge["labels"])
    assert labels["team"] == "a\ufffdb" and labels["k\ufffd"] == "v"
    assert labels["ledger_guard"] == "cost_nano_usd,labels,latency_ms,model,output_tokens"
    neg = rows["negative-overflow"]
    assert (neg["input_tokens"], neg["saved_nano_usd"]) == (-(2**31), INT8[0])


# --- AdminService, CLI and health ---------------------------------------------------------------


@dataclass
class Mesh:
    stub: admin_pb2_grpc.AdminServiceStub
    health: health_pb2_grpc.HealthStub
    address: str
    pool: asyncpg.Pool
    client: redis.Redis
    stream: str
    writer: LedgerWriter
    store: DeadLetterStore
    monitor: DeadLetterMonitor
    admin_key: str
    member_key: str

    def md(self, key: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {key or self.admin_key}"),)


@pytest.fixture
async def mesh(clean_env: None, pool: asyncpg.Pool, client: redis.Redis, database_url: str, redis_url: str,
               redis_prefix: str) -> AsyncIterator[Mesh]:
    admin_key = await bootstrap(pool, [DefaultModel("m-cheap", "fake", "127.0.0.1:1", 8192, "cheap", 100, 200, 50)])
    assert admin_key is not None
    control = ControlPlane(pool, RevocationBus(client, redis_prefix))
    [listing] = await control.list_keys("", "")
    p = listing.record.principal
    member = await control.create_key("test", org_id=p.org_id, team_id=p.team_id, name="member", role="member",
                                      allowed_models=[], expires_at=None)
    registry = Registry(pool, 60)
    await registry.load()
    stream = f"{redis_prefix}usage"
    store = DeadLetterStore(client, pool, stream)
    servicer = AdminServicer(control, Authenticator(control, cache_ttl_s=1.0), registry)
    servicer.serve_dead_letters(store)
    settings = RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url)
    server = GrpcServer(settings, [ServiceBinding(
        "tollgate.router.v1.AdminService", lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, s))])
    ledger_health = LedgerHealth()
    port = await server.start()
    await ledger_health.attach(server)
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Mesh(admin_pb2_grpc.AdminServiceStub(channel), health_pb2_grpc.HealthStub(channel),
                   f"127.0.0.1:{port}", pool, client, stream, writer, store,
                   DeadLetterMonitor(store, ledger_health.publish, every_s=0.05), admin_key, member.secret)
    finally:
        await channel.close()
        await server.stop(0)


async def _health(m: Mesh, service: str) -> int:
    status: int = (await m.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
    return status


async def _dead_letter_one(m: Mesh, event: UsageEvent) -> str:
    await m.client.xadd(m.stream, {"e": event.to_json()})
    await m.writer.drain_once()
    page = await m.store.list_page()
    return page.letters[-1].id


async def test_a_repaired_row_is_replayed_into_the_ledger_exactly_once(mesh: Mesh) -> None:
    await _refuse_negative_costs(mesh.pool)
    dead_id = await _dead_letter_one(mesh, _event("req-1", cost=-5))
    await mesh.monitor.check_once()
    assert await _health(mesh, LEDGER_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await _health(mesh, "") == health_pb2.HealthCheckResponse.SERVING  # requests are still served

    listed = await mesh.stub.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), metadata=mesh.md())
    assert listed.total == 1
    [letter] = listed.dead_letters
    assert (letter.id, letter.request_id, letter.attempts) == (dead_id, "req-1", 1)
    assert letter.reason.startswith("CheckViolationError [23514]") and letter.HasField("dead_time")
    assert json.loads(letter.event_json)["cost_nano_usd"] == -5

    # As it is, it is refused again: it stays, with the new reason, under a new id.
    again = await mesh.stub.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(ids=[dead_id]), metadata=mesh.md())
    [r] = again.results
    assert r.outcome == admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_REFUSED and r.reason.startswith("CheckViolationError")
    assert r.new_id and r.new_id != dead_id and again.remaining == 1
    [letter] = (await mesh.stub.ListDeadLetters(admin_pb2.ListDeadLettersRequest(), metadata=mesh.md())).dead_letters
    assert (letter.id, letter.attempts) == (r.new_id, 2)

    # Repaired: a repair must keep the request id (the row's identity).
    repaired = json.loads(letter.event_json) | {"cost_nano_usd": 5}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(
            ids=[letter.id], repaired_event_json=json.dumps(repaired | {"request_id": "other"})), metadata=mesh.md())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    done = await mesh.stub.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(
        ids=[letter.id], repaired_event_json=json.dumps(repaired)), metadata=mesh.md())
    assert [x.outcome for x in done.results] == [admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_INSERTED]
    assert done.remaining == 0
    assert (await _ledger(mesh.pool))["req-1"]["cost_nano_usd"] == 5

    # Replayed twice: the id is gone (NOT_FOUND); the same dead letter back again (a crash after the commit,
    # before its removal, leaves it there) is removed without a second row.
    twice = await mesh.stub.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(
        ids=[letter.id], repaired_event_json=json.dumps(repaired)), metadata=mesh.md())
    assert [x.outcome for x in twice.results] == [admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_NOT_FOUND]
    await mesh.client.xadd(f"{mesh.stream}:dead", {"e": json.dumps(repaired), "id": "0-1", "request_id": "req-1",
                                                   "reason": "x"})
    third = await mesh.stub.ReplayDeadLetters(admin_pb2.ReplayDeadLettersRequest(all=True), metadata=mesh.md())
    assert [x.outcome for x in third.results] == [admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_ALREADY_IN_LEDGER]
    assert len(await _ledger(mesh.pool)) == 1 and await mesh.client.xlen(f"{mesh.stream}:dead") == 0

    await mesh.monitor.check_once()
    assert await _health(mesh, LEDGER_HEALTH_SERVICE) == health_pb2.HealthCheckResponse.SERVING
    async with mesh.pool.acquire() as conn:
        audit = await conn.fetch("SELECT before, after FROM audit_log WHERE action = 'replay_dead_letter' ORDER BY id")
    assert [json.loads(a["after"])["outcome"] for a in audit] == ["inserted", "already_in_ledger"]
    assert json.loads(audit[0]["after"])["repaired"] is True


async def test_replay_all_inserts_what_the_ledger_now_accepts_and_keeps_the_rest(mesh: Mesh) -> None:
    await _refuse_negative_costs(mesh.pool)
    for i in range(3):
        await _dead_letter_one(mesh, _event(f"neg-{i}", cost=-1))
    async with mesh.pool.acquire() as conn:  # the operator fixes the schema instead of the rows
        await conn.execute("ALTER TABLE usage_ledger DROP CONSTRAINT test_cost_not_negative")
    await mesh.client.xadd(f"{mesh.stream}:dead", {"e": "{broken", "id": "0-9", "reason": "malformed: not JSON"})
    result = await mesh.store.replay("ops", None)
    assert [r.outcome for r in result] == [ReplayOutcome.INSERTED] * 3 + [ReplayOutcome.REFUSED]
    assert sorted(await _ledger(mesh.pool)) == ["neg-0", "neg-1", "neg-2"]
    assert await mesh.store.count() == 1  # the broken one stays, and is not visited twice in one replay


async def test_a_member_key_can_neither_list_nor_replay(mesh: Mesh) -> None:
    for call, request in ((mesh.stub.ListDeadLetters, admin_pb2.ListDeadLettersRequest()),
                          (mesh.stub.ReplayDeadLetters, admin_pb2.ReplayDeadLettersRequest(all=True))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, metadata=mesh.md(mesh.member_key))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("bad_id", ["\u0661\u0662-1", "\u00b2", "99999999999999999999999", "1-2-3", "-1", "1-",
                                    "18446744073709551616-0"])
async def test_an_id_redis_would_refuse_is_invalid_argument(mesh: Mesh, bad_id: str) -> None:
    # Regression: str.isdigit() let Unicode digits and out-of-range numbers through; Redis then answered
    # "Invalid stream ID" and the caller got UNAVAILABLE for its own bad input.
    calls = [(mesh.stub.ListDeadLetters, admin_pb2.ListDeadLettersRequest(page_token=bad_id), "page_token"),
             (mesh.stub.ReplayDeadLetters, admin_pb2.ReplayDeadLettersRequest(ids=[bad_id]), "ids")]
    for call, request, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, metadata=mesh.md(mesh.admin_key))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())


async def _cli(m: Mesh, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """The `tollgate` console script's entry point, as its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from ops.cli import main; main()", *args, "--router", m.address, cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", "TOLLGATE_ADMIN_KEY": m.admin_key})
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_the_cli_lists_and_replays_dead_letters(mesh: Mesh, tmp_path: Path) -> None:
    await _refuse_negative_costs(mesh.pool)
    dead_id = await _dead_letter_one(mesh, _event("req-cli", cost=-7))

    code, out = await _cli(mesh, "dead-letters", "list", "--events")
    assert code == 1, out  # non-zero while dead letters exist
    assert dead_id in out and "req-cli" in out and "CheckViolationError" in out and "1 dead letter(s)" in out

    letter = (await mesh.store.list_page()).letters[0]
    repaired = tmp_path / "repaired.json"
    repaired.write_text(json.dumps(json.loads(letter.event_json) | {"cost_nano_usd": 7}))
    code, out = await _cli(mesh, "dead-letters", "replay", dead_id, "--event-file", str(repaired))
    assert code == 0, out
    assert "inserted" in out and "0 dead letter(s) left" in out
    code, out = await _cli(mesh, "dead-letters", "replay", dead_id, "--event-file", str(repaired))
    assert code == 1 and "NOT FOUND" in out, out
    assert [r["cost_nano_usd"] for r in (await _ledger(mesh.pool)).values()] == [7]

    code, out = await _cli(mesh, "dead-letters", "list", "--json")
    assert code == 0 and out.strip() == "", out
    code, out = await _cli(mesh, "dead-letters", "replay")
    assert code == 2 and "give the ids to replay, or --all" in out


async def test_the_router_reports_dead_letters_on_its_health_service(
        clean_env: None, database_url: str, redis_url: str, redis_prefix: str, client: redis.Redis,
        tmp_path: Path) -> None:
    # Wired as services.router.server.serve does it: build(), then the server, then attach.
    from services.router.server import build
    from tests.support import infra

    settings = RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url,
                              redis_prefix=redis_prefix, data_dir=str(tmp_path), dead_letter_check_s=0.05,
                              cache_target=f"127.0.0.1:{infra.free_port()}",
                              ratelimit_target=f"127.0.0.1:{infra.free_port()}",
                              retrieval_target=f"127.0.0.1:{infra.free_port()}")
    ledger_health = LedgerHealth()
    bindings, close = await build(settings, ledger_health)
    server = GrpcServer(settings, bindings)
    port = await server.start()
    await ledger_health.attach(server)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        value: int = (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
        return value

    async def until(service: str, want: int) -> None:
        for _ in range(100):
            if await status(service) == want:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{service} never became {want}")

    try:
        await until(LEDGER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        dead = f"{redis_prefix}usage:dead"
        entry = await client.xadd(dead, {"e": "{", "id": "0-1", "reason": "malformed: not JSON"})
        await until(LEDGER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        # The count itself, on the same Check call (trailing metadata, as grpcurl -v shows it).
        check = stub.Check(health_pb2.HealthCheckRequest(service=LEDGER_HEALTH_SERVICE), timeout=5)
        await check
        assert dict(await check.trailing_metadata())["tollgate-dead-letters"] == "1"
        for service in ("", "tollgate.router.v1.RouterService", "tollgate.router.v1.AdminService"):
            assert await status(service) == health_pb2.HealthCheckResponse.SERVING  # the router still serves
        await client.xdel(dead, entry)
        await until(LEDGER_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    finally:
        await channel.close()
        await server.stop(0)
        await close()


async def test_hostile_entries_are_set_aside_and_never_block_the_stream(
        pool: asyncpg.Pool, client: redis.Redis, redis_prefix: str, tmp_path: Path) -> None:
    # Entries nobody but a forger writes: one that would crash the parser (nesting), one whose request id
    # cannot even be encoded back for the dead-letter stream (a lone surrogate). Neither may stall the rest.
    stream = f"{redis_prefix}usage"
    writer = LedgerWriter(client, pool, stream, consumer="w", block_ms=20)
    await writer.ensure_group()
    await client.xadd(stream, {"e": "[" * 100_000 + "]" * 100_000})
    surrogate = json.loads(_event("x").to_json()) | {"request_id": "\ud800", "input_tokens": "no"}
    await client.xadd(stream, {"e": json.dumps(surrogate)})
    # Labels that are not a map, with a field that needs guarding (a naive time): guard_event raised TypeError
    # outside any handler, and the entry stalled the stream for good. Now it is stored, labelled as guarded.
    not_a_map = json.loads(_event("y").to_json()) | {"labels": None, "started_at": "2024-01-01T00:00:00"}
    await client.xadd(stream, {"e": json.dumps(not_a_map)})
    await UsageRecorder(client, stream, tmp_path).record(_event("good"))
    await writer.drain_once()
    assert sorted(await _ledger(pool)) == ["good", "y"]
    assert await _pending_empty(client, stream)
    reasons = sorted(d["reason"] for d in await _dead(client, stream))
    assert len(reasons) == 2
    assert reasons[0].startswith("DataError") and reasons[1] == "malformed: RecursionError"
