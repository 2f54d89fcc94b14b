"""Cost report: ledger totals -> one self-contained HTML page with charts (``tollgate report``).

The numbers come from the router's usage report (AdminService.GetUsageReport, read by
``ops.admin_cli.AdminApi``), so the page shows exactly what the ledger holds. Amounts are integer
nano-USD until they are printed; a printed amount is exact (no rounding), trailing zeros trimmed.
Charts are PNGs rendered with matplotlib (Agg, no display) and embedded as base64, so the file can
be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import html
import io
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from tollgate.router.v1 import admin_pb2

from libs.chat import Principal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# More series than this in one chart is unreadable: the rest are summed as "other".
MAX_SERIES = 8
OTHER = "other"


@dataclass(frozen=True)
class UsageRow:
    """One group of AdminService.GetUsageReport (``UsageReportRow``)."""

    group_values: tuple[str, ...]
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_nano_usd: int
    saved_nano_usd: int
    cache_hits: int
    errors: int
    cancelled: int = 0

    @classmethod
    def from_proto(cls, r: admin_pb2.UsageReportRow) -> UsageRow:
        return cls(tuple(r.group_values), r.requests, r.input_tokens, r.output_tokens, r.cached_input_tokens,
                   r.cost_nano_usd, r.saved_nano_usd, r.cache_hits, r.errors, r.cancelled)


@dataclass(frozen=True)
class TeamRow:
    """What the report needs of a team (``TeamInfo``)."""

    team_id: str
    org_id: str
    name: str

    @classmethod
    def from_proto(cls, t: admin_pb2.TeamInfo) -> TeamRow:
        return cls(t.team_id, t.org_id, t.name)


@dataclass(frozen=True)
class KeyRow:
    """What the report and the reconciliation need of a key (``KeyInfo``; never its secret)."""

    key_id: str
    principal: Principal
    name: str
    revoked: bool

    @classmethod
    def from_proto(cls, k: admin_pb2.KeyInfo) -> KeyRow:
        return cls(k.key_id, Principal(k.principal.org_id, k.principal.team_id, k.key_id), k.name, k.revoked)


class UsageSource(Protocol):
    """Where the report reads from (the CLI's AdminService adapter, ``ops.admin_cli.AdminApi``)."""

    async def usage_report(self, start: datetime, end: datetime, group_by: list[str]) -> list[UsageRow]: ...

    async def list_teams(self, org_id: str) -> list[TeamRow]: ...

    async def list_keys(self, org_id: str, team_id: str) -> list[KeyRow]: ...


@dataclass(frozen=True)
class KeyLine:
    key_id: str
    name: str
    team: str
    usage: UsageRow


@dataclass
class CostReport:
    start: datetime
    end: datetime
    generated_at: datetime
    days: list[str]
    totals: UsageRow
    by_team: list[UsageRow]  # group_values = (team label,)
    by_model: list[UsageRow]  # group_values = (model,)
    by_day: dict[str, UsageRow]
    team_day: dict[str, dict[str, int]]  # team label -> day -> cost
    model_day: dict[str, dict[str, int]]  # model -> day -> cost
    top_keys: list[KeyLine] = field(default_factory=list)

    @property
    def cache_hit_rate(self) -> float:
        return self.totals.cache_hits / self.totals.requests if self.totals.requests else 0.0


def usd(nano: int) -> str:
    """Exact dollars from nano-USD: ``450_000`` -> ``$0.00045``, ``3 * 10**12`` -> ``$3,000.00``."""
    sign = "-" if nano < 0 else ""
    text = f"{Decimal(abs(nano)).scaleb(-9):,.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{sign}${whole}.{frac.ljust(2, '0')}"


def _empty(group: tuple[str, ...] = ()) -> UsageRow:
    return UsageRow(group, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _day_range(start: datetime, end: datetime) -> list[str]:
    first, last = start.astimezone(UTC).date(), (end.astimezone(UTC) - timedelta(microseconds=1)).date()
    out: list[str] = []
    d: date = first
    while d <= last:
        out.append(d.isoformat())
        d += timedelta(days=1)
    return out


def _team_labels(teams: Iterable[TeamRow]) -> dict[str, str]:
    teams = list(teams)
    names = [t.name for t in teams]
    # A team name is unique only inside its org: add the id when two orgs reuse a name.
    return {t.team_id: t.name if names.count(t.name) == 1 else f"{t.name} ({t.team_id})" for t in teams}


async def collect(source: UsageSource, start: datetime, end: datetime, *, top_keys: int = 10,
                  now: datetime | None = None) -> CostReport:
    """Read everything the report shows, for ledger rows started in ``[start, end)``."""
    teams = _team_labels(await source.list_teams(""))
    keys = {k.key_id: k for k in await source.list_keys("", "")}

    def team_label(team_id: str) -> str:
        return teams.get(team_id, team_id)

    totals = await source.usage_report(start, end, [])
    by_team_rows = await source.usage_report(start, end, ["team"])
    by_model = await source.usage_report(start, end, ["model"])
    by_day_rows = await source.usage_report(start, end, ["day"])
    team_day_rows = await source.usage_report(start, end, ["day", "team"])
    model_day_rows = await source.usage_report(start, end, ["day", "model"])
    key_rows = await source.usage_report(start, end, ["key"])

    team_day: dict[str, dict[str, int]] = defaultdict(dict)
    for r in team_day_rows:
        day, team = r.group_values
        team_day[team_label(team)][day] = team_day[team_label(team)].get(day, 0) + r.cost_nano_usd
    model_day: dict[str, dict[str, int]] = defaultdict(dict)
    for r in model_day_rows:
        day, model = r.group_values
        model_day[model][day] = r.cost_nano_usd
    by_team = sorted((UsageRow((team_label(r.group_values[0]),), *_counts(r)) for r in by_team_rows),
                     key=lambda r: (-r.cost_nano_usd, r.group_values))
    lines = []
    for r in sorted(key_rows, key=lambda r: (-r.cost_nano_usd, r.group_values))[:top_keys]:
        key_id = r.group_values[0]
        listing = keys.get(key_id)
        lines.append(KeyLine(key_id, listing.name if listing else "",
                             team_label(listing.principal.team_id) if listing else "", r))
    return CostReport(
        start=start, end=end, generated_at=now or datetime.now(UTC), days=_day_range(start, end),
        totals=totals[0] if totals else _empty(), by_team=by_team,
        by_model=sorted(by_model, key=lambda r: (-r.cost_nano_usd, r.group_values)),
        by_day={r.group_values[0]: r for r in by_day_rows}, team_day=dict(team_day), model_day=dict(model_day),
        top_keys=lines)


def _counts(r: UsageRow) -> tuple[int, int, int, int, int, int, int, int, int]:
    return (r.requests, r.input_tokens, r.output_tokens, r.cached_input_tokens, r.cost_nano_usd, r.saved_nano_usd,
            r.cache_hits, r.errors, r.cancelled)


# --- charts --------------------------------------------------------------------------------

def _top_series(series: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    ranked = sorted(series, key=lambda name: (-sum(series[name].values()), name))
    kept = {name: series[name] for name in ranked[:MAX_SERIES]}
    rest = ranked[MAX_SERIES:]
    if rest:
        other: dict[str, int] = defaultdict(int)
        for name in rest:
            for day, cost in series[name].items():
                other[day] += cost
        kept[OTHER] = dict(other)
    return kept


def _usd_axis(ax: Axes) -> None:
    from matplotlib.ticker import FuncFormatter

    # Typical daily amounts range from fractions of a cent to thousands of dollars: %g keeps both short.
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"${value:,.6g}"))


def _new_figure(height: float = 3.6) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _day_ticks(ax: Axes, days: list[str]) -> None:
    step = max(1, len(days) // 12)
    ax.set_xticks(range(0, len(days), step))
    ax.set_xticklabels([d[5:] for d in days[::step]], rotation=0)  # MM-DD; the range is in the header
    ax.set_xlabel("day (UTC)")


def stacked_spend_chart(title: str, series: dict[str, dict[str, int]], days: list[str]) -> bytes:
    """Stacked bars of spend per day, one colour per series (team or model)."""
    fig, ax = _new_figure()
    bottoms = [0.0] * len(days)
    cmap = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D"]
    for i, (name, per_day) in enumerate(_top_series(series).items()):
        values = [per_day.get(d, 0) / 1e9 for d in days]
        ax.bar(range(len(days)), values, bottom=bottoms, label=name, color=cmap[i % len(cmap)], width=0.8)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.set_ylabel("spend (USD)")
    _usd_axis(ax)
    _day_ticks(ax, days)
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=9)
    return _png(fig)


def savings_chart(report: CostReport) -> bytes:
    """Spend and cache savings side by side per day, with the cache hit rate on a second axis."""
    fig, ax = _new_figure()
    days = report.days
    rows = [report.by_day.get(d, _empty((d,))) for d in days]
    x = range(len(days))
    ax.bar([i - 0.2 for i in x], [r.cost_nano_usd / 1e9 for r in rows], width=0.4, label="spent", color="#4C78A8")
    ax.bar([i + 0.2 for i in x], [r.saved_nano_usd / 1e9 for r in rows], width=0.4, label="saved by the cache",
           color="#54A24B")
    ax.set_title("Cache savings per day", loc="left", fontsize=12, fontweight="bold")
    ax.set_ylabel("USD")
    _usd_axis(ax)
    _day_ticks(ax, days)
    rate = ax.twinx()
    # No point (a gap in the line) for a day without requests, rather than a misleading 0%.
    rate.plot(list(x), [100 * r.cache_hits / r.requests if r.requests else float("nan") for r in rows], color="#E45756",
              marker="o", markersize=3, label="cache hit rate")
    rate.set_ylim(0, 100)
    rate.set_ylabel("hit rate (%)")
    rate.spines["top"].set_visible(False)
    handles = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", bbox_to_anchor=(1.08, 1.0),
              frameon=False, fontsize=9)
    return _png(fig)


def top_keys_chart(report: CostReport) -> bytes:
    lines = list(reversed(report.top_keys))  # barh draws bottom-up: the biggest goes on top
    fig, ax = _new_figure(height=max(2.0, 0.4 * len(lines) + 1.0))
    labels = [f"{k.name or k.key_id} ({k.team})" if k.team else (k.name or k.key_id) for k in lines]
    ax.barh(range(len(lines)), [k.usage.cost_nano_usd / 1e9 for k in lines], color="#4C78A8")
    ax.set_yticks(range(len(lines)))
    ax.set_yticklabels(labels, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.grid(axis="y", visible=False)
    ax.set_title("Top keys by spend", loc="left", fontsize=12, fontweight="bold")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"${v:,.6g}"))
    return _png(fig)


# --- the page --------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1000px;
       color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
.muted { color: #666; } .cards { display: flex; gap: 1rem; flex-wrap: wrap; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: 0.6rem 1rem; min-width: 150px; }
.card b { display: block; font-size: 1.25rem; }
table { border-collapse: collapse; width: 100%; margin: 0.5rem 0 1rem; }
th, td { text-align: right; padding: 4px 8px; border-bottom: 1px solid #eee; font-variant-numeric: tabular-nums; }
th:first-child, td:first-child { text-align: left; } th { background: #f6f6f6; }
img { max-width: 100%; }
"""


def _card(label: str, value: str) -> str:
    return f'<div class="card"><span class="muted">{html.escape(label)}</span><b>{html.escape(value)}</b></div>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _money(nano: int) -> str:
    # The exact integer stays in the page for anyone checking a figure against the ledger.
    return f'<td data-nano-usd="{nano}">{html.escape(usd(nano))}</td>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _td(text: object) -> str:
    return f"<td>{html.escape(str(text))}</td>"


def _usage_cells(r: UsageRow) -> list[str]:
    return [_td(f"{r.requests:,}"), _money(r.cost_nano_usd), _money(r.saved_nano_usd), _td(f"{r.cache_hits:,}"),
            _td(f"{r.input_tokens:,}"), _td(f"{r.cached_input_tokens:,}"), _td(f"{r.output_tokens:,}"),
            _td(f"{r.errors:,}"), _td(f"{r.cancelled:,}")]


_USAGE_HEAD = ["requests", "spent", "saved by cache", "cache hits", "input tokens", "cached input", "output tokens",
               "errors", "cancelled"]


def render_html(report: CostReport) -> str:
    t = report.totals
    period = f"{report.start.astimezone(UTC):%Y-%m-%d %H:%M} to {report.end.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    charts = [
        ("Spend by team", _img(stacked_spend_chart("Spend by team per day", report.team_day, report.days),
                               "stacked bars: spend per day by team")),
        ("Spend by model", _img(stacked_spend_chart("Spend by model per day", report.model_day, report.days),
                                "stacked bars: spend per day by model")),
        ("Cache savings", _img(savings_chart(report), "bars: spend and cache savings per day; line: hit rate")),
    ]
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tollgate cost report, {html.escape(period)}</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>tollgate cost report</h1>",
        f'<p class="muted">Ledger rows of requests started {html.escape(period)}; generated '
        f'{report.generated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC. Amounts are exact.</p>',
        '<div class="cards">', _card("spent", usd(t.cost_nano_usd)), _card("saved by the cache", usd(t.saved_nano_usd)),
        _card("requests", f"{t.requests:,}"), _card("cache hit rate", f"{100 * report.cache_hit_rate:.1f}%"),
        _card("errors", f"{t.errors:,}"), _card("cancelled (billed)", f"{t.cancelled:,}"), "</div>",
    ]
    for heading, img in charts:
        parts += [f"<h2>{html.escape(heading)}</h2>", img]
    total_row = ["<td><b>total</b></td>", *_usage_cells(t)]
    parts += ["<h2>By team</h2>",
              _table(["team", *_USAGE_HEAD],
                     [*([_td(r.group_values[0]), *_usage_cells(r)] for r in report.by_team), total_row]),
              "<h2>By model</h2>",
              _table(["model", *_USAGE_HEAD],
                     [*([_td(r.group_values[0]), *_usage_cells(r)] for r in report.by_model), total_row])]
    parts += ["<h2>Top keys</h2>"]
    if report.top_keys:
        parts.append(_img(top_keys_chart(report), "horizontal bars: spend of the top keys"))
    parts.append(_table(["key", "key id", "team", *_USAGE_HEAD],
                        [[_td(k.name), _td(k.key_id), _td(k.team), *_usage_cells(k.usage)] for k in report.top_keys]))
    parts += ["<h2>By day</h2>",
              _table(["day", *_USAGE_HEAD], [[_td(d), *_usage_cells(report.by_day.get(d, _empty((d,))))]
                                             for d in report.days])]
    parts.append("</body></html>")
    return "\n".join(parts)
