"""The cost report from seeded ledger rows in a real PostgreSQL, read through the router's AdminService over
real gRPC (as ``tollgate report`` reads it): the numbers, the page, the CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from ops import admin_cli
from ops.report import collect, render_html, savings_chart, stacked_spend_chart, usd
from services.router.control.plane import ControlPlane
from tests.integration.ops.conftest import RouterAdmin

DAY1 = datetime(2026, 3, 1, 10, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 4, tzinfo=UTC)


async def _seed(pool: asyncpg.Pool) -> dict[str, str]:
    """Two teams, three keys, two models, two days; returns names -> ids."""
    cp = ControlPlane(pool)
    org = await cp.create_org("t", "acme")
    search = await cp.create_team("t", org, "search")
    ads = await cp.create_team("t", org, "ads")
    ids = {"org": org, "search": search, "ads": ads}
    for name, team in (("crawler", search), ("ranker", search), ("bidder", ads)):
        ids[name] = (await cp.create_key("t", org_id=org, team_id=team, name=name, role="member", allowed_models=[],
                                         expires_at=None)).key_id
    rows = [
        # request, started, key, team, model, cost, saved, tier, status
        ("a1", DAY1, "crawler", "search", "small", 1_500_000_000, 0, "miss", "ok"),
        ("a2", DAY1, "crawler", "search", "small", 0, 1_500_000_000, "exact", "ok"),
        ("a3", DAY1, "ranker", "search", "large", 250_000_000, 0, "miss", "ok"),
        ("a4", DAY2, "bidder", "ads", "large", 4_000_000_000, 0, "miss", "ok"),
        ("a5", DAY2, "bidder", "ads", "large", 450_000, 0, "miss", "cancelled"),
        ("a6", DAY2, "ranker", "search", "small", 0, 0, "miss", "error"),
        ("a7", DAY2, "ranker", "search", "small", 0, 700_000_000, "semantic", "ok"),
        ("old", DAY1 - timedelta(days=5), "crawler", "search", "small", 9_999_000_000, 0, "miss", "ok"),
    ]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO usage_ledger (request_id, started_at, finished_at, org_id, team_id, key_id, model, provider,"
            " input_tokens, output_tokens, cached_input_tokens, cost_nano_usd, saved_nano_usd, cache_tier, status,"
            " latency_ms) VALUES ($1, $2, $2, $3, $4, $5, $6, 'p', 100, 50, 10, $7, $8, $9, $10, 5)",
            [(r, when, org, ids[team], ids[key], model, cost, saved, tier, status)
             for r, when, key, team, model, cost, saved, tier, status in rows])
    return ids



def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


async def test_report_numbers_from_the_ledger(router_admin: RouterAdmin) -> None:
    ids = await _seed(router_admin.pool)
    report = await collect(router_admin.api, START, END)
    t = report.totals
    assert (t.requests, t.cost_nano_usd, t.saved_nano_usd) == (7, 5_750_450_000, 2_200_000_000)  # "old" is outside
    assert (t.cache_hits, t.errors, t.cancelled) == (2, 1, 1)
    assert report.days == ["2026-03-01", "2026-03-02", "2026-03-03"]
    assert [(r.group_values[0], r.cost_nano_usd) for r in report.by_team] == [("ads", 4_000_450_000),
                                                                            ("search", 1_750_000_000)]
    assert report.team_day["search"] == {"2026-03-01": 1_750_000_000, "2026-03-02": 0}
    assert report.model_day["large"] == {"2026-03-01": 250_000_000, "2026-03-02": 4_000_450_000}
    assert [(k.name, k.team, k.usage.cost_nano_usd) for k in report.top_keys] == [
        ("bidder", "ads", 4_000_450_000), ("crawler", "search", 1_500_000_000), ("ranker", "search", 250_000_000)]
    assert report.top_keys[0].key_id == ids["bidder"]
    assert report.by_day["2026-03-02"].saved_nano_usd == 700_000_000
    assert report.cache_hit_rate == pytest.approx(2 / 7)


async def test_report_page_is_self_contained_and_shows_the_numbers(router_admin: RouterAdmin, tmp_path: Path) -> None:
    await _seed(router_admin.pool)
    page = render_html(await collect(router_admin.api, START, END))
    for text in ("$5.75045", "$2.20", "$4.00045", "$1.75", "bidder", "crawler", "ads", "search",
                 "28.6%", 'data-nano-usd="5750450000"', "Spend by team",
                 "Cache savings", "Top keys"):
        assert text in page, text
    assert "$9.999" not in page  # a row outside the range
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from elsewhere"
    assert "<script" not in page
    images = _pngs(page)
    assert len(images) == 4  # team, model, savings, top keys
    from PIL import Image

    for png in images:
        with Image.open(io.BytesIO(png)) as img:
            assert img.format == "PNG" and img.width >= 800 and img.height >= 200
    (tmp_path / "report.html").write_text(page)


def test_charts_render_with_no_data_and_with_many_series() -> None:
    days = ["2026-03-01", "2026-03-02"]
    assert stacked_spend_chart("empty", {}, days).startswith(b"\x89PNG")
    many = {f"team-{i}": {"2026-03-01": i * 1_000_000} for i in range(20)}
    assert stacked_spend_chart("many", many, days).startswith(b"\x89PNG")


async def test_report_command_writes_the_page(router_admin: RouterAdmin, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    await _seed(router_admin.pool)
    monkeypatch.setenv("TOLLGATE_ADMIN_KEY", router_admin.admin_key)
    out = tmp_path / "out" / "report.html"
    # In a thread: the command runs its own event loop, the router serves on this one.
    code = await asyncio.to_thread(admin_cli.main, [
        "report", "--router", router_admin.address, "--out", str(out), "--start", "2026-03-01", "--end", "2026-03-03"])
    assert code == 0
    page = out.read_text()
    assert usd(5_750_450_000) in page and len(_pngs(page)) == 4
    assert "7 requests" in capsys.readouterr().out


def test_report_command_needs_an_admin_key_for_the_router(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TOLLGATE_ADMIN_KEY", raising=False)
    assert admin_cli.main(["report", "--out", str(tmp_path / "r.html")]) == 2
    assert "admin key" in capsys.readouterr().err


async def test_savings_chart_draws(router_admin: RouterAdmin) -> None:
    await _seed(router_admin.pool)
    report = await collect(router_admin.api, START, END)
    assert savings_chart(report).startswith(b"\x89PNG")
