"""Control plane against a real PostgreSQL database (fresh per test)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from libs.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from libs.pg_migrations import migration_files
from services.router.control.bootstrap import MIGRATIONS, DefaultModel, apply_migrations, bootstrap
from services.router.control.keys import hash_key
from services.router.control.plane import ControlPlane
from services.router.control.registry import Registry


async def test_migrations_are_idempotent(database_url: str) -> None:
    assert await apply_migrations(database_url) == [v for v, _ in migration_files(MIGRATIONS)]
    assert await apply_migrations(database_url) == []


async def test_keys_are_stored_hashed_and_revocable(pool: asyncpg.Pool) -> None:
    cp = ControlPlane(pool)
    org = await cp.create_org("admin", "acme")
    team = await cp.create_team("admin", org, "search")
    created = await cp.create_key("admin", org_id=org, team_id=team, name="ci", role="member",
                                  allowed_models=["m1"], expires_at=None)
    async with pool.acquire() as conn:
        stored = await conn.fetchrow("SELECT key_hash, display_prefix FROM api_keys WHERE key_id = $1",
                                     created.key_id)
        dump = str(await conn.fetch("SELECT * FROM api_keys"))
    assert stored["key_hash"] == hash_key(created.secret)
    assert created.secret not in dump  # the secret itself is nowhere in the table
    record = await cp.find_by_hash(hash_key(created.secret))
    assert record is not None and record.principal.team_id == team and record.allowed_models == ("m1",)
    await cp.revoke_key("admin", created.key_id)
    assert (await cp.find_by_hash(hash_key(created.secret))).revoked  # type: ignore[union-attr]
    with pytest.raises(NotFound):
        await cp.revoke_key("admin", "key_missing")
    actions = [e.action for e in await cp.audit_events(10)]
    assert actions == ["revoke_key", "create_key", "create_team", "create_org"]


async def test_keys_carry_a_service_tier(pool: asyncpg.Pool) -> None:
    cp = ControlPlane(pool)
    org = await cp.create_org("admin", "acme")
    team = await cp.create_team("admin", org, "search")
    free = await cp.create_key("admin", org_id=org, team_id=team, name="f", role="member", allowed_models=[],
                               expires_at=None, tier="free")
    default = await cp.create_key("admin", org_id=org, team_id=team, name="d", role="member", allowed_models=[],
                                  expires_at=None)
    assert (await cp.find_by_hash(hash_key(free.secret))).tier == "free"  # type: ignore[union-attr]
    assert (await cp.find_by_hash(hash_key(default.secret))).tier == "pro"  # type: ignore[union-attr]
    assert {k.name: k.record.tier for k in await cp.list_keys(org, "")} == {"f": "free", "d": "pro"}
    with pytest.raises(InvalidArgument):
        await cp.create_key("admin", org_id=org, team_id=team, name="x", role="member", allowed_models=[],
                            expires_at=None, tier="platinum")
    async with pool.acquire() as conn:  # the database refuses an unknown tier too
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE api_keys SET tier = 'gold' WHERE key_id = $1", free.key_id)


async def test_hierarchy_is_enforced(pool: asyncpg.Pool) -> None:
    cp = ControlPlane(pool)
    org_a, org_b = await cp.create_org("a", "a"), await cp.create_org("a", "b")
    team_b = await cp.create_team("a", org_b, "t")
    with pytest.raises(FailedPrecondition):
        await cp.create_key("a", org_id=org_a, team_id=team_b, name="x", role="member", allowed_models=[],
                            expires_at=None)
    with pytest.raises(AlreadyExists):
        await cp.create_org("a", "a")
    with pytest.raises(InvalidArgument):
        await cp.create_org("a", "  ")


async def test_price_versions_never_rewrite_history(pool: asyncpg.Pool) -> None:
    cp = ControlPlane(pool)
    await cp.register_model("a", name="m", provider="p", inference_target="x:1", context_window=100,
                            cost_tier="cheap")
    v1 = await cp.set_price("a", model="m", input_per_mtok=100, output_per_mtok=200, cached_input_per_mtok=50,
                            effective_from=None)
    later = datetime.now(UTC) + timedelta(hours=1)
    v2 = await cp.set_price("a", model="m", input_per_mtok=300, output_per_mtok=400, cached_input_per_mtok=50,
                            effective_from=later)
    assert v2 > v1
    with pytest.raises(InvalidArgument):
        await cp.set_price("a", model="m", input_per_mtok=1, output_per_mtok=1, cached_input_per_mtok=1,
                           effective_from=datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(NotFound):
        await cp.set_price("a", model="nope", input_per_mtok=1, output_per_mtok=1, cached_input_per_mtok=1,
                           effective_from=None)
    registry = Registry(pool, 60)
    await registry.load()
    assert registry.price("m", datetime.now(UTC)).version == v1  # type: ignore[union-attr]
    assert registry.price("m", later + timedelta(seconds=1)).version == v2  # type: ignore[union-attr]


async def test_bootstrap_creates_one_admin_key_once(pool: asyncpg.Pool) -> None:
    models = [DefaultModel("demo", "p", "127.0.0.1:1", 1000, "cheap", 1, 2, 0)]
    first = await bootstrap(pool, models)
    assert first is not None and first.startswith("tg-")
    assert await bootstrap(pool, models) is None
    record = await ControlPlane(pool).find_by_hash(hash_key(first))
    assert record is not None and record.is_admin


async def test_usage_report_groups_and_sums_exactly(pool: asyncpg.Pool) -> None:
    day1 = datetime(2026, 3, 1, 12, tzinfo=UTC)
    day2 = datetime(2026, 3, 2, 12, tzinfo=UTC)
    rows = [("r1", day1, "k1", "m1", 10, 5, 1_000, 0, "miss", "ok"),
            ("r2", day1, "k1", "m1", 10, 5, 0, 1_000, "exact", "ok"),
            ("r3", day2, "k2", "m2", 7, 3, 3_000_000_000_000, 0, "miss", "ok"),
            ("r4", day2, "k2", "m2", 0, 0, 0, 0, "miss", "error")]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider,"
            " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, cache_tier, status,"
            " latency_ms) VALUES ($1, $2, $2, 'o', 't', $3, $4, 'p', $5, $6, 0, $7, $8, $9, $10, 1)", rows)
    cp = ControlPlane(pool)
    by_key = {r.group_values: r for r in await cp.usage_report(day1 - timedelta(days=1), day2 + timedelta(days=1),
                                                               ["key"])}
    assert by_key[("k1",)].requests == 2 and by_key[("k1",)].cache_hits == 1
    assert by_key[("k1",)].cost_nano_usd == 1_000 and by_key[("k1",)].saved_nano_usd == 1_000
    assert by_key[("k2",)].cost_nano_usd == 3_000_000_000_000 and by_key[("k2",)].errors == 1
    assert isinstance(by_key[("k2",)].cost_nano_usd, int)
    by_day_model = [r.group_values for r in await cp.usage_report(day1 - timedelta(days=1),
                                                                   day2 + timedelta(days=1), ["day", "model"])]
    assert by_day_model == [("2026-03-01", "m1"), ("2026-03-02", "m2")]
    only_day1 = await cp.usage_report(day1 - timedelta(hours=1), day1 + timedelta(hours=1), [])
    assert only_day1[0].requests == 2
    with pytest.raises(InvalidArgument):
        await cp.usage_report(day2, day1, [])
