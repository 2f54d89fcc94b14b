"""A/B experiments on a real PostgreSQL: create/end, one active per model, feedback (idempotent and
tenant-checked), the report over ledger rows; and the RPCs over real gRPC."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import grpc
import pytest
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from libs.chat import Principal
from libs.errors import AlreadyExists, InvalidArgument, NotFound
from libs.grpc_errors import domain_error_from_rpc
from libs.grpc_server import GrpcServer, ServiceBinding
from ops import admin_cli as cli_admin
from services.router.control.admin_servicer import AdminServicer
from services.router.control.bootstrap import DefaultModel, apply_migrations, bootstrap
from services.router.control.experiment_stats import welch_t_test
from services.router.control.experiments import DOWN, UP, ExperimentBook, ExperimentStore, Variant, variant_label
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry
from services.router.db import create_pool
from services.router.pipeline.authenticate import Authenticator
from services.router.pipeline.gateway import Gateway
from services.router.servicer import RouterServicer
from services.router.settings import RouterSettings

ORG_A = Principal("org_a", "team_a", "key_a")
ORG_B = Principal("org_b", "team_b", "key_b")
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
VARIANTS = [Variant("control", "m-small", 1), Variant("treatment", "m-large", 1)]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await apply_migrations(database_url)
    p = await create_pool(database_url)
    cp = ControlPlane(p)
    for name in ("m-small", "m-large"):
        await cp.register_model("test", name=name, provider="fake", inference_target="127.0.0.1:1",
                                context_window=8192, cost_tier="cheap")
    yield p
    await p.close()


async def _ledger(pool: asyncpg.Pool, rows: list[tuple[str, str, str, int, int, str]]) -> None:
    """rows: (request_id, org_id, variant label, latency_ms, cost_nano_usd, status)."""
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider,"
            " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, cache_tier, status,"
            " latency_ms, variant) VALUES ($1, $2, $2, $3, 't', 'k', 'm', 'p', 10, 10, 0, $4, 0, 'miss', $5, $6, $7)",
            [(rid, T0, org, cost, status, latency, variant) for rid, org, variant, latency, cost, status in rows])


async def _feedback_rows(pool: asyncpg.Pool) -> list[tuple[str, str, int]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT request_id, org_id, score FROM experiment_feedback ORDER BY 1, 2")
    return [(r["request_id"], r["org_id"], r["score"]) for r in rows]


async def test_create_end_and_one_active_experiment_per_model(pool: asyncpg.Pool) -> None:
    store = ExperimentStore(pool)
    first = await store.create("admin1", "exp1", "chat-default", VARIANTS)
    assert (first.active, first.ended_at, first.created_by) == (True, None, "admin1")
    assert first.variants == tuple(VARIANTS) and first.control.name == "control"

    with pytest.raises(AlreadyExists) as err:
        await store.create("admin1", "exp2", "chat-default", VARIANTS)
    assert err.value.reason == "EXPERIMENT_ACTIVE"
    with pytest.raises(AlreadyExists):  # a used name, whatever the model
        await store.create("admin1", "exp1", "other-model", VARIANTS)
    other = await store.create("admin1", "exp-auto", "auto", [Variant("a", "auto", 1), Variant("b", "m-large", 3)])
    with pytest.raises(InvalidArgument) as bad:
        await store.create("admin1", "exp3", "x", [Variant("a", "m-small", 1), Variant("b", "nope", 1)])
    assert [v.field for v in bad.value.violations] == ["variants[1].model"]

    assert {e.name for e in await store.active_experiments()} == {"exp1", "exp-auto"}
    ended = await store.end("admin2", "exp1")
    assert not ended.active and ended.ended_at is not None
    assert await store.end("admin2", "exp1") == ended  # idempotent
    with pytest.raises(NotFound):
        await store.end("admin2", "missing")
    # The model is free again; the old experiment stays listed (its report stays readable).
    await store.create("admin1", "exp2", "chat-default", VARIANTS)
    assert [e.name for e in await store.active_experiments()] == ["exp2", "exp-auto"]
    listed = await store.list_experiments()
    assert {e.name: e.active for e in listed} == {"exp1": False, "exp2": True, "exp-auto": True}
    assert (await store.get("exp-auto")).variants == other.variants

    async with pool.acquire() as conn:
        audit = await conn.fetch("SELECT actor_key_id, action, target FROM audit_log "
                                 "WHERE action LIKE '%experiment' ORDER BY id")
        # The database itself refuses a second active experiment on one model (several routers, races).
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO experiments (name, model, variants, created_by) "
                               "VALUES ('sneaky', 'chat-default', '[{}, {}]', 'x')")
    assert [tuple(r) for r in audit] == [("admin1", "create_experiment", "experiment:exp1"),
                                         ("admin1", "create_experiment", "experiment:exp-auto"),
                                         ("admin2", "end_experiment", "experiment:exp1"),
                                         ("admin1", "create_experiment", "experiment:exp2")]


async def test_the_book_follows_the_store(pool: asyncpg.Pool) -> None:
    store = ExperimentStore(pool)
    book = ExperimentBook(store, refresh_s=60)
    await store.create("a", "exp1", "chat-default", VARIANTS)
    await book.load()
    found = book.for_request("chat-default", "alice")
    assert found is not None and found[0].name == "exp1"
    assert book.for_request("m-small", "alice") is None
    await store.end("a", "exp1")
    await book.load()
    assert book.for_request("chat-default", "alice") is None


async def test_feedback_is_idempotent_and_tenant_checked(pool: asyncpg.Pool) -> None:
    store = ExperimentStore(pool)
    await _ledger(pool, [("req-a", ORG_A.org_id, "", 10, 0, "ok")])

    await store.record_feedback(ORG_A, "req-a", UP)
    await store.record_feedback(ORG_A, "req-a", UP)
    assert await _feedback_rows(pool) == [("req-a", "org_a", 1)]
    await store.record_feedback(ORG_A, "req-a", DOWN)  # last one wins
    assert await _feedback_rows(pool) == [("req-a", "org_a", -1)]

    with pytest.raises(NotFound):  # another org's request: as if it did not exist
        await store.record_feedback(ORG_B, "req-a", UP)
    assert await _feedback_rows(pool) == [("req-a", "org_a", -1)]

    with pytest.raises(InvalidArgument) as err:
        await store.record_feedback(ORG_A, "", 0)
    assert {v.field for v in err.value.violations} == {"request_id", "score"}

    # Not in the ledger yet (it is written seconds behind): kept under the caller's org...
    await store.record_feedback(ORG_A, "req-late", UP)
    await store.record_feedback(ORG_B, "req-late", DOWN)  # ...and another org cannot overwrite it
    assert await _feedback_rows(pool) == [("req-a", "org_a", -1), ("req-late", "org_a", 1),
                                          ("req-late", "org_b", -1)]
    # Once the row lands, only the owner's feedback counts.
    experiment = await store.create("a", "exp1", "chat-default", VARIANTS)
    label = variant_label(experiment, experiment.control)
    await _ledger(pool, [("req-late", ORG_A.org_id, label, 10, 0, "ok")])
    stats = await store.variant_stats(experiment)
    assert (stats["control"].feedback_up, stats["control"].feedback_down) == (1, 0)
    with pytest.raises(NotFound):
        await store.record_feedback(ORG_B, "req-late", DOWN)


async def test_report_over_ledger_rows(pool: asyncpg.Pool) -> None:
    store = ExperimentStore(pool)
    experiment = await store.create("a", "exp1", "chat-default", VARIANTS)
    control, treatment = (variant_label(experiment, v) for v in experiment.variants)
    c_lat = [100 + (i * 7) % 23 for i in range(40)]
    t_lat = [130 + (i * 5) % 29 for i in range(40)]
    c_cost = [1000 + (i * 13) % 50 for i in range(40)]
    t_cost = [x + 1 for x in reversed(c_cost)]  # the same spread, 1 nano-USD dearer: not a real difference
    rows = [(f"c{i}", ORG_A.org_id, control, c_lat[i], c_cost[i], "ok") for i in range(40)]
    rows += [(f"t{i}", ORG_A.org_id, treatment, t_lat[i], t_cost[i], "ok") for i in range(40)]
    # Failures count in the error rate, not in latency or cost.
    rows += [("c-err", ORG_A.org_id, control, 5, 0, "error")]
    rows += [(f"t-err{i}", ORG_A.org_id, treatment, 60_000, 999_999, s)
             for i, s in enumerate(("error", "cancelled", "error"))]
    # Not this experiment: another experiment's variant, an unlabelled row.
    rows += [("other", ORG_A.org_id, "exp0/control", 1, 1, "ok"), ("plain", ORG_A.org_id, "", 1, 1, "ok")]
    await _ledger(pool, rows)
    for i in range(10):
        await store.record_feedback(ORG_A, f"c{i}", UP if i < 8 else DOWN)
        await store.record_feedback(ORG_A, f"t{i}", UP if i < 3 else DOWN)

    report = await store.report("exp1")
    c, t = (m.stats for m in report.variants)
    assert (c.requests, c.ok_requests, c.errors) == (41, 40, 1)
    assert (t.requests, t.ok_requests, t.errors) == (43, 40, 3)
    assert c.error_rate == pytest.approx(1 / 41) and t.error_rate == pytest.approx(3 / 43)
    assert c.latency_mean_ms == pytest.approx(statistics.mean(c_lat))
    assert c.latency_p50_ms == pytest.approx(statistics.median(c_lat))
    assert t.latency_p50_ms == pytest.approx(statistics.median(t_lat))
    assert c.latency_var == pytest.approx(statistics.variance(c_lat))
    assert t.cost_mean_nano_usd == pytest.approx(statistics.mean(t_cost))
    assert (c.feedback_up, c.feedback_down, t.feedback_up, t.feedback_down) == (8, 2, 3, 7)
    assert t.feedback_up_rate == pytest.approx(0.3)

    by_metric = {cmp.metric: cmp for cmp in report.comparisons}
    assert report.corrected_alpha == pytest.approx(0.05 / 4) and len(report.comparisons) == 4
    latency = by_metric["latency_ms"]
    expected = welch_t_test(statistics.mean(c_lat), statistics.variance(c_lat), 40,
                            statistics.mean(t_lat), statistics.variance(t_lat), 40)
    assert latency.p_value == pytest.approx(expected.p_value) and latency.significant
    assert not by_metric["cost_nano_usd"].significant
    assert not by_metric["error_rate"].significant
    fb = by_metric["feedback_up_rate"]
    # 80 % vs 30 % up on 10 ratings each: p = 0.025, significant alone, not at 0.05 / 4.
    assert fb.p_value is not None and 0.0125 < fb.p_value < 0.05 and not fb.significant
    assert (await store.report("exp1", alpha=0.2)).comparisons[3].significant

    with pytest.raises(NotFound):
        await store.report("missing")
    with pytest.raises(InvalidArgument):
        await store.report("exp1", alpha=0)


# --- over gRPC ------------------------------------------------------------------------------

async def test_experiment_rpcs_and_cli(clean_env: None, database_url: str, redis_url: str, pool: asyncpg.Pool,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    admin_key = await bootstrap(pool, [DefaultModel("m-cheap", "fake", "127.0.0.1:1", 8192, "cheap", 1, 2, 1)])
    assert admin_key is not None
    control = ControlPlane(pool)
    [listing] = await control.list_keys("", "")
    org_a = listing.record.principal
    other_org = await control.create_org("t", "other")
    other_team = await control.create_team("t", other_org, "t")
    other = await control.create_key("t", org_id=other_org, team_id=other_team, name="m", role="member",
                                      allowed_models=[], expires_at=None)
    auth = Authenticator(control, cache_ttl_s=1.0)
    registry = Registry(pool, 60)
    store = ExperimentStore(pool)
    book = ExperimentBook(store, refresh_s=60)
    admin_servicer = AdminServicer(control, auth, registry, experiments=store, experiment_book=book)
    router_servicer = RouterServicer(cast(Gateway, None), auth, default_timeout_s=5, max_timeout_s=10,
                                     experiments=store)
    settings = RouterSettings(host="127.0.0.1", port=0, database_url=database_url, redis_url=redis_url)
    server = GrpcServer(settings, [
        ServiceBinding("tollgate.router.v1.AdminService",
                       lambda s: admin_pb2_grpc.add_AdminServiceServicer_to_server(admin_servicer, s)),
        ServiceBinding("tollgate.router.v1.RouterService",
                       lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(router_servicer, s))])
    port = await server.start()
    md = (("authorization", f"Bearer {admin_key}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        router = router_pb2_grpc.RouterServiceStub(channel)

        async def call(stub: Any, method: str, request: Any, key_md: Any = md) -> Any:
            return await getattr(stub, method)(request, metadata=key_md, timeout=10)

        async def error(stub: Any, method: str, request: Any, key_md: Any = md) -> tuple[grpc.StatusCode, Any]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(stub, method, request, key_md)
            return err.value.code(), domain_error_from_rpc(err.value)

        try:
            resp = await call(admin, "CreateExperiment", admin_pb2.CreateExperimentRequest(
                name="exp1", model="chat-default", variants=[
                    admin_pb2.ExperimentVariant(name="control", model="m-small", weight=1),
                    admin_pb2.ExperimentVariant(name="treatment", model="m-large", weight=2)]))
            assert resp.experiment.active and resp.experiment.created_by == org_a.key_id
            assert [v.weight for v in resp.experiment.variants] == [1, 2]
            assert not resp.experiment.HasField("ended_at")
            assert book.for_request("chat-default", "u1") is not None  # this router's book reloaded at once

            code, err = await error(admin, "CreateExperiment", admin_pb2.CreateExperimentRequest(
                name="BAD", model="", variants=[admin_pb2.ExperimentVariant(name="a", model="m-small", weight=-1)]))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert {v.field for v in err.violations} == {"name", "model", "variants", "variants[0].weight"}

            label = "exp1/treatment"
            await _ledger(pool, [("r1", org_a.org_id, label, 100, 10, "ok"),
                                 ("r2", org_a.org_id, label, 120, 10, "ok")])
            member_md = (("authorization", f"Bearer {other.secret}"),)
            await call(router, "SubmitFeedback", router_pb2.SubmitFeedbackRequest(
                request_id="r1", score=router_pb2.FEEDBACK_SCORE_UP))
            code, _ = await error(router, "SubmitFeedback", router_pb2.SubmitFeedbackRequest(
                request_id="r1", score=router_pb2.FEEDBACK_SCORE_DOWN), member_md)
            assert code == grpc.StatusCode.NOT_FOUND
            code, err = await error(router, "SubmitFeedback", router_pb2.SubmitFeedbackRequest())
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert {v.field for v in err.violations} == {"request_id", "score"}
            code, _ = await error(router, "SubmitFeedback", router_pb2.SubmitFeedbackRequest(
                request_id="r1", score=router_pb2.FEEDBACK_SCORE_UP), ())
            assert code == grpc.StatusCode.UNAUTHENTICATED

            report = await call(admin, "GetExperimentReport", admin_pb2.GetExperimentReportRequest(name="exp1"))
            assert report.alpha == pytest.approx(0.05) and report.corrected_alpha == pytest.approx(0.0125)
            assert [(v.variant, v.requests, v.feedback_up) for v in report.variants] == [("control", 0, 0),
                                                                                        ("treatment", 2, 1)]
            assert report.variants[1].latency_p50_ms == pytest.approx(110)
            assert len(report.comparisons) == 4
            assert report.comparisons[0].metric == admin_pb2.EXPERIMENT_METRIC_LATENCY
            assert not report.comparisons[0].HasField("p_value")  # no control traffic: nothing to test
            code, _ = await error(admin, "GetExperimentReport", admin_pb2.GetExperimentReportRequest(name="nope"))
            assert code == grpc.StatusCode.NOT_FOUND

            ended = await call(admin, "EndExperiment", admin_pb2.EndExperimentRequest(name="exp1"))
            assert not ended.experiment.active and ended.experiment.HasField("ended_at")
            assert book.for_request("chat-default", "u1") is None
            listed = await call(admin, "ListExperiments", admin_pb2.ListExperimentsRequest())
            assert [e.name for e in listed.experiments] == ["exp1"]
            assert not (await call(admin, "ListExperiments",
                                   admin_pb2.ListExperimentsRequest(active_only=True))).experiments

            # The CLI, through the same API.
            monkeypatch.setenv("TOLLGATE_ADMIN_KEY", admin_key)
            router_arg = ["--router", f"127.0.0.1:{port}"]
            capsys.readouterr()
            assert await asyncio.to_thread(cli_admin.main, [
                "experiment", "create", "exp-cli", "--model", "auto", "--variant", "a=m-small:1",
                "--variant", "b=m-large:3", *router_arg]) == 0
            assert "a=m-small (25%), b=m-large (75%)" in capsys.readouterr().out
            assert await asyncio.to_thread(cli_admin.main, ["experiment", "report", "exp1", *router_arg]) == 0
            out = capsys.readouterr().out
            assert "p < 0.05 / 4 = 0.0125 (Bonferroni)" in out and "treatment" in out
            assert await asyncio.to_thread(cli_admin.main, ["experiment", "list", "--active", *router_arg]) == 0
            listed_out = capsys.readouterr().out
            assert "exp-cli" in listed_out and "exp1" not in listed_out
            assert await asyncio.to_thread(cli_admin.main, ["experiment", "end", "nope", *router_arg]) == 2
            assert "NOT_FOUND" in capsys.readouterr().err
        finally:
            await server.stop(0)

