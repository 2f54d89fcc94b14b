"""Limit resolution, the PostgreSQL-backed store (real database), and settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from services.ratelimit.budgets import budget_lines_for
from services.ratelimit.limits import (
    Budgets,
    Level,
    Limits,
    LimitTable,
    PostgresLimitStore,
    Scope,
    Subject,
    rows_to_table,
)
from services.ratelimit.settings import RateLimitSettings

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "router" / "migrations"
SUBJECT = Subject("o1", "t1", "k1", client_ip="10.0.0.1")


def by_scope(levels: list[Level]) -> dict[Scope, Limits]:
    return {level.scope: level.limits for level in levels}


def test_resolution_order() -> None:
    table = LimitTable({
        (Scope.KEY, "k1"): Limits(tokens_per_minute=100),
        (Scope.KEY, "*"): Limits(tokens_per_minute=200),
        (Scope.TEAM, "t1"): Limits(requests_per_minute=5),
        (Scope.CLIENT_IP, "*"): Limits(requests_per_minute=7),
        (Scope.ORG, "other"): Limits(requests_per_minute=9),
    }, key_default=Limits(tokens_per_minute=300))
    levels = table.levels_for(SUBJECT)
    assert [(lv.scope, lv.scope_id) for lv in levels] == [
        (Scope.KEY, "k1"), (Scope.TEAM, "t1"), (Scope.CLIENT_IP, "10.0.0.1")]
    assert [lv.subject for lv in levels] == ["key:k1", "team:t1", "client_ip:10.0.0.1"]
    assert by_scope(table.levels_for(Subject("o1", "t1", "k2")))[Scope.KEY] == Limits(tokens_per_minute=200)
    # Without a wildcard row the configured key default applies.
    assert by_scope(LimitTable(key_default=Limits(3, 4, 5)).levels_for(SUBJECT)) == {Scope.KEY: Limits(3, 4, 5)}


def test_global_rows_merge_to_the_strictest() -> None:
    table = LimitTable({
        (Scope.GLOBAL, "*"): Limits(requests_per_minute=100, tokens_per_minute=0),
        (Scope.GLOBAL, ""): Limits(requests_per_minute=50, tokens_per_minute=1000),
    })
    [level] = table.levels_for(SUBJECT)
    assert level.subject == "global" and level.limits == Limits(50, 1000, 0)


def test_rows_to_table_skips_unknown_scopes() -> None:
    table = rows_to_table([
        {"scope": "key", "scope_id": "k1", "requests_per_minute": 1, "tokens_per_minute": 2, "tokens_per_day": 3},
        {"scope": "planet", "scope_id": "x", "requests_per_minute": 1, "tokens_per_minute": 0, "tokens_per_day": 0},
    ], Limits())
    assert len(table) == 1 and table.resolve(Scope.KEY, "k1") == Limits(1, 2, 3)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    from libs.pg_migrations import migrate

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, MIGRATIONS)
    finally:
        await conn.close()
    p = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    yield p
    await p.close()


async def test_postgres_store_loads_and_picks_up_changes(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO limits (scope, scope_id, requests_per_minute, tokens_per_minute)"
                       " VALUES ('key', 'k1', 10, 1000), ('global', '*', 0, 50000)")
    store = PostgresLimitStore(pool, key_default=Limits(requests_per_minute=1), refresh_s=0.05)
    await store.start()
    try:
        got = by_scope(store.levels_for(SUBJECT))
        assert got == {Scope.KEY: Limits(10, 1000, 0), Scope.GLOBAL: Limits(0, 50000, 0)}
        assert by_scope(store.levels_for(Subject("o1", "t1", "k2")))[Scope.KEY] == Limits(requests_per_minute=1)

        await pool.execute("UPDATE limits SET tokens_per_minute = 20 WHERE scope = 'key' AND scope_id = 'k1'")
        await pool.execute("INSERT INTO limits (scope, scope_id, tokens_per_day) VALUES ('team', 't1', 99)")
        for _ in range(100):
            got = by_scope(store.levels_for(SUBJECT))
            if got.get(Scope.KEY) == Limits(10, 20, 0) and Scope.TEAM in got:
                break
            await asyncio.sleep(0.02)
        assert got[Scope.KEY] == Limits(10, 20, 0) and got[Scope.TEAM] == Limits(tokens_per_day=99)
    finally:
        await store.close()


async def test_postgres_store_keeps_last_good_snapshot(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO limits (scope, scope_id, requests_per_minute) VALUES ('key', 'k1', 10)")
    store = PostgresLimitStore(pool, refresh_s=0.05)
    await store.start()
    try:
        await pool.execute("ALTER TABLE limits RENAME TO limits_gone")
        await asyncio.sleep(0.15)  # a few failed reloads
        assert by_scope(store.levels_for(SUBJECT)) == {Scope.KEY: Limits(requests_per_minute=10)}
    finally:
        await store.close()


async def test_postgres_store_starts_without_a_database() -> None:
    bad = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0, max_size=1, timeout=1)
    store = PostgresLimitStore(bad, key_default=Limits(requests_per_minute=3), refresh_s=10)
    try:
        await store.start()  # does not raise: defaults apply until the database answers
        assert store.loaded_at is None
        assert by_scope(store.levels_for(SUBJECT)) == {Scope.KEY: Limits(requests_per_minute=3)}
    finally:
        await store.close()
        await bad.close()


@pytest.mark.usefixtures("clean_env")
def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = RateLimitSettings()
    assert (s.port, s.reservation_ttl_s, s.limits_refresh_s, s.replicas) == (50053, 120.0, 2.0, 1)
    assert (s.default_key_rpm, s.default_key_tpm) == (0, 0)
    assert s.database_enabled and s.redis_prefix == "tg:"
    monkeypatch.setenv("TOLLGATE_RATELIMIT_PORT", "6000")
    monkeypatch.setenv("TOLLGATE_RATELIMIT_DEFAULT_KEY_TPM", "10000")
    monkeypatch.setenv("TOLLGATE_RATELIMIT_REPLICAS", "3")
    monkeypatch.setenv("TOLLGATE_REDIS_PREFIX", "x:")
    monkeypatch.setenv("TOLLGATE_DATABASE_URL", "")
    s = RateLimitSettings()
    assert (s.port, s.default_key_tpm, s.replicas, s.redis_prefix) == (6000, 10000, 3, "x:")
    assert not s.database_enabled
    monkeypatch.setenv("TOLLGATE_DATABASE_URL", "postgresql://h/db")
    monkeypatch.setenv("TOLLGATE_RATELIMIT_USE_DATABASE", "false")
    assert not RateLimitSettings().database_enabled


@pytest.mark.usefixtures("clean_env")
def test_invalid_settings_exit_with_the_variable_name(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from libs.settings import SettingsError, load_settings

    monkeypatch.setenv("TOLLGATE_RATELIMIT_DEFAULT_KEY_RPM", "-1")
    with pytest.raises(SettingsError):
        load_settings(RateLimitSettings)
    assert "TOLLGATE_RATELIMIT_DEFAULT_KEY_RPM" in capsys.readouterr().err


def test_client_ip_rows_match_any_spelling_of_the_address() -> None:
    table = LimitTable({(Scope.CLIENT_IP, "2001:DB8:0::1"): Limits(requests_per_minute=1),
                        (Scope.CLIENT_IP, "::ffff:10.0.0.7"): Limits(requests_per_minute=2)})
    assert table.resolve(Scope.CLIENT_IP, "2001:db8::1") == Limits(requests_per_minute=1)
    assert table.resolve(Scope.CLIENT_IP, "10.0.0.7") == Limits(requests_per_minute=2)


def test_budget_resolution() -> None:
    table = LimitTable(budgets={
        (Scope.KEY, "k1"): Budgets(daily_nano_usd=100),
        (Scope.TEAM, "*"): Budgets(monthly_nano_usd=5_000),
        (Scope.ORG, "o1"): Budgets(0, 0),  # all-zero: no budget, and no fallthrough
        (Scope.GLOBAL, "*"): Budgets(daily_nano_usd=10_000, monthly_nano_usd=0),
        (Scope.GLOBAL, ""): Budgets(daily_nano_usd=20_000, monthly_nano_usd=90_000),
        (Scope.CLIENT_IP, "10.0.0.1"): Budgets(daily_nano_usd=1),  # not a budget level: ignored
    })
    levels = table.levels_for(SUBJECT)
    assert [(lv.scope, lv.budgets) for lv in levels] == [
        (Scope.KEY, Budgets(daily_nano_usd=100)), (Scope.TEAM, Budgets(monthly_nano_usd=5_000)),
        (Scope.GLOBAL, Budgets(daily_nano_usd=10_000, monthly_nano_usd=90_000))]
    lines = budget_lines_for(levels)
    assert [(b.name, b.limit) for b in lines] == [
        ("key:k1 daily budget", 100), ("team:t1 monthly budget", 5_000), ("global daily budget", 10_000),
        ("global monthly budget", 90_000)]
    # Budgets and limits of one level travel together.
    both = LimitTable({(Scope.KEY, "k1"): Limits(requests_per_minute=1)},
                      budgets={(Scope.KEY, "k1"): Budgets(daily_nano_usd=7)})
    assert both.levels_for(SUBJECT) == [Level(Scope.KEY, "k1", Limits(requests_per_minute=1), Budgets(7, 0))]


async def test_postgres_store_loads_budgets_and_picks_up_changes(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO budgets (scope, scope_id, daily_nano_usd, monthly_nano_usd)"
                       " VALUES ('team', 't1', 1000, 0), ('org', 'o1', 0, 50000)")
    store = PostgresLimitStore(pool, refresh_s=0.05)
    await store.start()
    try:
        got = {lv.scope: lv.budgets for lv in store.levels_for(SUBJECT)}
        assert got == {Scope.TEAM: Budgets(daily_nano_usd=1000), Scope.ORG: Budgets(monthly_nano_usd=50000)}
        await pool.execute("UPDATE budgets SET daily_nano_usd = 2000 WHERE scope = 'team'")
        await pool.execute("INSERT INTO budgets (scope, scope_id, daily_nano_usd) VALUES ('key', 'k1', 5)")
        for _ in range(100):
            got = {lv.scope: lv.budgets for lv in store.levels_for(SUBJECT)}
            if got.get(Scope.TEAM) == Budgets(daily_nano_usd=2000) and Scope.KEY in got:
                break
            await asyncio.sleep(0.02)
        assert got[Scope.TEAM] == Budgets(daily_nano_usd=2000) and got[Scope.KEY] == Budgets(daily_nano_usd=5)
    finally:
        await store.close()
