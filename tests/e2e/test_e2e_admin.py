"""The control plane through the running mesh (separate processes): the admin CLI, revocation seen
by a second router process, the cost report and reconciliation, and no raw key in any log, error
message, database row or Redis value."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import asyncpg
import grpc
import pytest
import redis.asyncio as redis
from tollgate.common.v1 import common_pb2
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from ops import admin_cli
from ops.launcher import free_port
from tests.e2e.conftest import MODEL, RunningMesh
from tests.support import infra
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.e2e


def _md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def _req(content: str, *, no_cache: bool = True, max_tokens: int = 16) -> router_pb2.GenerationInput:
    return router_pb2.GenerationInput(
        model=MODEL, messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=content)],
        params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=max_tokens),
        cache_control=router_pb2.CacheControl(no_cache=no_cache))


async def _principal(mesh: RunningMesh) -> common_pb2.Principal:
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        listing = await admin_pb2_grpc.AdminServiceStub(ch).ListKeys(admin_pb2.ListKeysRequest(),
                                                                     metadata=_md(mesh.admin_key))
    return listing.keys[0].principal


async def _create_key(mesh: RunningMesh, role: int = admin_pb2.KEY_ROLE_MEMBER) -> admin_pb2.CreateKeyResponse:
    p = await _principal(mesh)
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        created: admin_pb2.CreateKeyResponse = await admin_pb2_grpc.AdminServiceStub(ch).CreateKey(
            admin_pb2.CreateKeyRequest(org_id=p.org_id, team_id=p.team_id, name=f"e2e-{uuid.uuid4().hex[:6]}",
                                       role=role), metadata=_md(mesh.admin_key))
    return created


def test_cli_creates_a_key_says_how_it_is_stored_and_revokes_it(mesh: RunningMesh, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOLLGATE_ADMIN_KEY", mesh.admin_key)
    p = asyncio.run(_principal(mesh))
    assert admin_cli.main(["key", "create", "--router", mesh.router, "--org", p.org_id, "--team", p.team_id,
                           "--name", "from-cli"]) == 0
    out = capsys.readouterr().out
    key = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("key    :"))
    key_id = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("key id :"))
    assert key.startswith("tg-") and "shown once" in out and "sha256" in out and "brute force" in out
    assert admin_cli.main(["key", "list", "--router", mesh.router]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and key not in listed
    assert admin_cli.main(["key", "revoke", "--router", mesh.router, key_id]) == 0
    assert admin_cli.main(["audit", "--router", mesh.router, "--target", key_id]) == 0
    audit = capsys.readouterr().out
    assert "revoke_key" in audit and "create_key" in audit and key not in audit
    # A member key is refused with a clear message, and the key is not echoed.
    member = asyncio.run(_create_key(mesh))
    monkeypatch.setenv("TOLLGATE_ADMIN_KEY", member.key)
    assert admin_cli.main(["key", "list", "--router", mesh.router]) == 2
    err = capsys.readouterr().err
    assert "PERMISSION_DENIED" in err and member.key not in err


async def test_a_second_router_rejects_a_revoked_key_within_a_second(mesh: RunningMesh, tmp_path: Path) -> None:
    s = mesh.mesh.settings
    port = free_port()
    second = ServiceProcess("router", port, {
        **mesh.mesh.env, "TOLLGATE_DATA_DIR": str(tmp_path), "TOLLGATE_ROUTER_PORT": str(port),
        "TOLLGATE_ROUTER_CACHE_TARGET": f"{s.host}:{s.cache_port}",
        "TOLLGATE_ROUTER_RATELIMIT_TARGET": f"{s.host}:{s.ratelimit_port}",
        "TOLLGATE_ROUTER_RUN_LEDGER_WRITER": "false"}, tmp_path)
    try:
        await asyncio.to_thread(second.wait_ready, 60)
        latencies = []
        async with grpc.aio.insecure_channel(mesh.router) as ch_a, \
                grpc.aio.insecure_channel(second.address) as ch_b:
            a, b = admin_pb2_grpc.AdminServiceStub(ch_a), admin_pb2_grpc.AdminServiceStub(ch_b)
            for _ in range(3):
                doomed = await _create_key(mesh, admin_pb2.KEY_ROLE_ADMIN)
                await b.ListModels(admin_pb2.ListModelsRequest(), metadata=_md(doomed.key))  # now cached on b
                started = time.monotonic()
                await a.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=doomed.key_id), metadata=_md(mesh.admin_key))
                while True:
                    try:
                        await b.ListModels(admin_pb2.ListModelsRequest(), metadata=_md(doomed.key), timeout=5)
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                        break
                    assert time.monotonic() - started < 5, "the second router still accepts a revoked key"
                    await asyncio.sleep(0.005)
                latencies.append(time.monotonic() - started)
        print(f"\nrevocation seen by a second router process after {[round(x * 1000) for x in latencies]} ms")
        # The bound is 1 s; a little margin for the poll and a loaded 2-core machine.
        assert max(latencies) < 1.25
    finally:
        second.stop()
    assert "tg-" not in second.log()


async def _ledger_has(mesh: RunningMesh, request_ids: list[str], timeout_s: float = 15) -> None:
    conn = await asyncpg.connect(mesh.database_url)
    try:
        deadline = time.monotonic() + timeout_s
        while await conn.fetchval("SELECT count(*) FROM usage_ledger WHERE request_id = ANY($1::text[])",
                                  request_ids) < len(request_ids):
            assert time.monotonic() < deadline, "usage did not reach the ledger"
            await asyncio.sleep(0.2)
    finally:
        await conn.close()


async def test_raw_keys_appear_in_no_log_error_row_or_redis_value(mesh: RunningMesh) -> None:
    created = await _create_key(mesh)
    key = created.key
    errors: list[str] = []
    async with grpc.aio.insecure_channel(mesh.router) as ch:
        router = router_pb2_grpc.RouterServiceStub(ch)
        ok = await router.Generate(router_pb2.GenerateRequest(input=_req(f"hello {uuid.uuid4().hex}")),
                                   metadata=_md(key), timeout=20)
        stream = router.GenerateStream(router_pb2.GenerateStreamRequest(input=_req("stream me")), metadata=_md(key),
                                       timeout=20)
        async for _ in stream:
            pass
        bad_calls = [
            router.Generate(router_pb2.GenerateRequest(input=router_pb2.GenerationInput(model="")), metadata=_md(key)),
            router.Generate(router_pb2.GenerateRequest(input=_req("x")), metadata=_md(key + "typo")),
            router.Generate(router_pb2.GenerateRequest(input=_req("x")), metadata=(("authorization", key),)),
            admin_pb2_grpc.AdminServiceStub(ch).ListKeys(admin_pb2.ListKeysRequest(), metadata=_md(key)),
        ]
        for call in bad_calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            errors.append(f"{err.value.code()} {err.value.details()} {err.value.trailing_metadata()}")
        await admin_pb2_grpc.AdminServiceStub(ch).RevokeKey(admin_pb2.RevokeKeyRequest(key_id=created.key_id),
                                                            metadata=_md(mesh.admin_key))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(router_pb2.GenerateRequest(input=_req("after revoke")), metadata=_md(key))
        errors.append(f"{err.value.code()} {err.value.details()} {err.value.trailing_metadata()}")
    await _ledger_has(mesh, [ok.summary.request_id])
    secrets = [key, mesh.admin_key]
    bodies = [s[len("tg-"):] for s in secrets]

    logs = {p.name: p.read_text(errors="replace") for p in (mesh.mesh.settings.data_dir / "logs").glob("*.log")}
    assert logs.get("router.log")
    conn = await asyncpg.connect(mesh.database_url)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = []
        for t in tables:
            rows += [r["j"] for r in await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{t}" t')]
    finally:
        await conn.close()
    client = redis.Redis.from_url(infra.REDIS_URL)
    try:
        values = []
        async for name in client.scan_iter(match=f"{mesh.redis_prefix}*", count=1000):
            kind = (await client.type(name)).decode()
            if kind == "string":
                values.append(repr(await client.get(name)))
            elif kind == "hash":
                values.append(repr(await client.hgetall(name)))
            elif kind == "stream":
                values.append(repr(await client.xrange(name)))
            elif kind == "zset":
                values.append(repr(await client.zrange(name, 0, -1)))
            values.append(repr(name))
    finally:
        await client.aclose()
    assert rows and values and errors
    for body in bodies:
        for name, text in logs.items():
            assert body not in text, f"a raw key is in {name}"
        assert not any(body in r for r in rows), "a raw key is stored in PostgreSQL"
        assert not any(body in v for v in values), "a raw key is stored in Redis"
        assert not any(body in e for e in errors), "a raw key is echoed in an error"


def test_report_and_reconcile_commands_against_the_mesh(mesh: RunningMesh, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    async def spend() -> tuple[str, list[str]]:
        created = await _create_key(mesh)
        async with grpc.aio.insecure_channel(mesh.router) as ch:
            await admin_pb2_grpc.AdminServiceStub(ch).SetBudget(admin_pb2.SetBudgetRequest(
                scope=common_pb2.LIMIT_SCOPE_KEY, scope_id=created.key_id, daily_nano_usd=10**12,
                monthly_nano_usd=10**13), metadata=_md(mesh.admin_key))
            await asyncio.sleep(1.0)  # the ratelimit service picks budgets up within its refresh interval
            router = router_pb2_grpc.RouterServiceStub(ch)
            ids = []
            for i in range(3):
                resp = await router.Generate(router_pb2.GenerateRequest(input=_req(f"spend {i} {uuid.uuid4().hex}")),
                                             metadata=_md(created.key), timeout=20)
                ids.append(resp.summary.request_id)
        await _ledger_has(mesh, ids)
        return created.key_id, ids

    key_id, _ = asyncio.run(spend())
    monkeypatch.setenv("TOLLGATE_ADMIN_KEY", mesh.admin_key)
    out = tmp_path / "report.html"
    assert admin_cli.main(["report", "--router", mesh.router, "--out", str(out), "--days", "2", "--top", "50"]) == 0
    page = out.read_text()
    assert MODEL in page and key_id in page and page.count("data:image/png;base64,") == 4
    capsys.readouterr()

    code = admin_cli.main(["reconcile", "--router", mesh.router, "--ratelimit",
                           f"{mesh.mesh.settings.host}:{mesh.mesh.settings.ratelimit_port}", "--json"])
    result = json.loads(capsys.readouterr().out)
    mine = [ln for ln in result["lines"] if ln["scope"] == "key" and ln["scope_id"] == key_id]
    assert {ln["period"] for ln in mine} == {"day", "month"}
    for ln in mine:
        assert ln["counter_nano_usd"] is not None, "the ratelimit service keeps no budget counter for the key"
        assert ln["ledger_nano_usd"] > 0 and ln["difference_nano_usd"] == 0, ln
    assert code in (0, 1) and (code == 1) == (result["differences"] > 0)
    assert os.environ["TOLLGATE_ADMIN_KEY"] == mesh.admin_key
