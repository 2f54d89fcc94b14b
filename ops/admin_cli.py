"""Admin subcommands of ``tollgate``: keys, audit, cost report, reconciliation, A/B experiments, ledger
dead letters.

They talk to a running router's AdminService with an admin key (``TOLLGATE_ADMIN_KEY`` or
``--admin-key-file``; never a command-line argument, where ``ps`` would show it), and
``reconcile`` also to the ratelimit service. Nothing here reads a database: ops talks to the mesh
over gRPC only.

Registered in ``ops/cli.py`` by ``register(sub)``; also runnable as ``python -m ops.admin_cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from tollgate.common.v1 import common_pb2
from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

from libs.chat import Principal
from libs.grpc_errors import domain_error_from_rpc
from ops import enums
from ops.reconcile import SpendCounter, reconcile
from ops.report import CostReport, KeyRow, TeamRow, UsageRow, collect, render_html, usd

DEFAULT_ROUTER = "127.0.0.1:50051"
DEFAULT_RATELIMIT = "127.0.0.1:50053"
CALL_TIMEOUT_S = 30.0

# The scopes a spend counter can have (reconcile.SCOPE_ORDER); budgets are never per client IP.
_BUDGET_SCOPES = ("global", "org", "team", "key")
# Which limit kinds are USD budgets, and the window each counts (the reconciliation's periods). A choice of
# two kinds, not a display table: labels come from the enum descriptors (ops.enums).
_BUDGET_PERIOD = {ratelimit_pb2.LIMIT_KIND_BUDGET_DAILY_NANO_USD: "day",
                  ratelimit_pb2.LIMIT_KIND_BUDGET_MONTHLY_NANO_USD: "month"}
_BUDGET_KIND = {period: kind for kind, period in _BUDGET_PERIOD.items()}


class CliError(Exception):
    """A problem to report in one line (exit code 2), not a traceback."""


def _ts(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt)
    return ts


def _dt(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(UTC)


def admin_key(args: argparse.Namespace) -> str:
    path: Path | None = getattr(args, "admin_key_file", None)
    key = path.read_text().strip() if path else os.environ.get("TOLLGATE_ADMIN_KEY", "").strip()
    if not key:
        raise CliError("an admin key is needed: set TOLLGATE_ADMIN_KEY or pass --admin-key-file")
    return key


class AdminApi:
    """AdminService as the report's ``UsageSource`` and the reconciliation's ``LedgerSource``."""

    def __init__(self, channel: grpc.aio.Channel, key: str):
        self.stub = admin_pb2_grpc.AdminServiceStub(channel)
        self._md = (("authorization", f"Bearer {key}"),)

    async def call(self, method: str, request: Any) -> Any:
        return await getattr(self.stub, method)(request, metadata=self._md, timeout=CALL_TIMEOUT_S)

    async def usage_report(self, start: datetime, end: datetime, group_by: list[str]) -> list[UsageRow]:
        resp = await self.call("GetUsageReport", admin_pb2.GetUsageReportRequest(
            start_time=_ts(start), end_time=_ts(end),
            group_by=[enums.value(admin_pb2.UsageGroupBy, g) for g in group_by]))
        return [UsageRow.from_proto(r) for r in resp.rows]

    async def list_teams(self, org_id: str) -> list[TeamRow]:
        resp = await self.call("ListTeams", admin_pb2.ListTeamsRequest(org_id=org_id))
        return [TeamRow.from_proto(t) for t in resp.teams]

    async def list_keys(self, org_id: str, team_id: str) -> list[KeyRow]:
        resp = await self.call("ListKeys", admin_pb2.ListKeysRequest(org_id=org_id, team_id=team_id))
        return [KeyRow.from_proto(k) for k in resp.keys]


class RateLimitCounters:
    """The ratelimit service's budget counters, read with GetUsage per principal (the reconciliation's
    ``CounterSource``)."""

    def __init__(self, channel: grpc.aio.Channel, concurrency: int = 8):
        self._stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
        self._sem = asyncio.Semaphore(concurrency)

    async def _one(self, p: Principal) -> Any:
        async with self._sem:
            return await self._stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=ratelimit_pb2.Subject(
                principal=common_pb2.Principal(org_id=p.org_id, team_id=p.team_id, key_id=p.key_id))),
                timeout=CALL_TIMEOUT_S)

    async def spend_counters(self, principals: list[Principal]) -> list[SpendCounter]:
        out: dict[tuple[str, str, str], SpendCounter] = {}
        for resp in await asyncio.gather(*(self._one(p) for p in principals)):
            if resp.degraded:
                raise CliError("the ratelimit service answers from its local fallback (Redis unavailable): "
                               "its counters are not the shared ones; try again later")
            for u in resp.usages:
                scope = enums.label(common_pb2.LimitScope, u.scope)
                if u.kind in _BUDGET_PERIOD and scope in _BUDGET_SCOPES:
                    # `used` includes what outstanding reservations hold; the ledger only has settled spend.
                    out[(scope, u.scope_id, _BUDGET_PERIOD[u.kind])] = SpendCounter(
                        scope, "" if scope == "global" else u.scope_id, _BUDGET_PERIOD[u.kind], u.used - u.reserved,
                        u.limit, u.reserved, _dt(u.window_start) if u.HasField("window_start") else None)
        return list(out.values())

    async def raise_to_ledger(self, scope: str, scope_id: str, period: str, window_start: datetime,
                              ledger_nano_usd: int) -> int:
        resp = await self._stub.ReconcileSpend(ratelimit_pb2.ReconcileSpendRequest(
            scope=enums.value(common_pb2.LimitScope, scope), scope_id=scope_id, kind=_BUDGET_KIND[period],
            window_time=_ts(window_start),
            ledger_spent_nano_usd=ledger_nano_usd), timeout=CALL_TIMEOUT_S)
        spent: int = resp.spent_nano_usd
        return spent


# --- commands --------------------------------------------------------------------------------

async def _with_admin(args: argparse.Namespace, body: Callable[[AdminApi], Awaitable[int]]) -> int:
    key = admin_key(args)
    async with grpc.aio.insecure_channel(args.router) as channel:
        return await body(AdminApi(channel, key))


async def _key_create(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        expires = (_ts(datetime.now(UTC) + timedelta(days=args.expires_in_days)) if args.expires_in_days else None)
        resp = await api.call("CreateKey", admin_pb2.CreateKeyRequest(
            org_id=args.org, team_id=args.team, name=args.name, role=enums.value(admin_pb2.KeyRole, args.role),
            allowed_models=args.model or [], expires_at=expires, tier=enums.value(admin_pb2.KeyTier, args.tier)))
        print(f"key id : {resp.key_id}")
        print(f"key    : {resp.key}")
        print()
        print(f"Copy the key now: it is shown once. Stored only as {resp.hash_algorithm or 'sha256'}.")
        if resp.hash_rationale:  # why a plain digest is enough: the router explains its own choice
            print(resp.hash_rationale)
        return 0

    return await _with_admin(args, body)


async def _key_revoke(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        await api.call("RevokeKey", admin_pb2.RevokeKeyRequest(key_id=args.key_id))
        print(f"revoked {args.key_id}: every router rejects it within 1 s")
        return 0

    return await _with_admin(args, body)


async def _key_list(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        resp = await api.call("ListKeys", admin_pb2.ListKeysRequest(org_id=args.org or "", team_id=args.team or ""))
        print(f"{'key id':<22} {'name':<24} {'role':<7} {'tier':<10} {'prefix':<11} {'team':<22} state")
        for k in resp.keys:
            state = "revoked" if k.revoked else "active"
            # KEY_TIER_UNSPECIFIED is treated as pro (admin.proto).
            tier = enums.label(admin_pb2.KeyTier, k.tier or admin_pb2.KEY_TIER_PRO)
            print(f"{k.key_id:<22} {k.name[:24]:<24} {enums.label(admin_pb2.KeyRole, k.role):<7} "
                  f"{tier:<10} {k.display_prefix:<11} {k.principal.team_id:<22} {state}")
        return 0

    return await _with_admin(args, body)


async def _audit(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        resp = await api.call("ListAuditEvents", admin_pb2.ListAuditEventsRequest(
            limit=args.limit, target=args.target or "", action=args.action or ""))
        for e in resp.events:
            print(f"{_dt(e.time):%Y-%m-%d %H:%M:%S} #{e.id} {e.actor_key_id} {e.action} {e.target}")
            print(f"    before: {e.before_json or '-'}")
            print(f"    after : {e.after_json or '-'}")
        return 0

    return await _with_admin(args, body)


def _report_range(args: argparse.Namespace) -> tuple[datetime, datetime]:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end = (datetime.combine(date.fromisoformat(args.end), datetime.min.time(), UTC) + timedelta(days=1)
           if args.end else today + timedelta(days=1))
    start = (datetime.combine(date.fromisoformat(args.start), datetime.min.time(), UTC) if args.start
             else end - timedelta(days=args.days))
    if end <= start:
        raise CliError("--end must not be before --start")
    return start, end


async def _collect_report(args: argparse.Namespace) -> CostReport:
    start, end = _report_range(args)
    key = admin_key(args)
    async with grpc.aio.insecure_channel(args.router) as channel:
        return await collect(AdminApi(channel, key), start, end, top_keys=args.top)


def _report(args: argparse.Namespace) -> int:
    report = asyncio.run(_collect_report(args))
    page = render_html(report)
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"wrote {out} ({len(page) // 1024} KiB): {report.totals.requests:,} requests, "
          f"spent {usd(report.totals.cost_nano_usd)}, saved {usd(report.totals.saved_nano_usd)} by the cache")
    return 0


async def _reconcile(args: argparse.Namespace) -> int:
    key = admin_key(args)
    async with grpc.aio.insecure_channel(args.router) as router, grpc.aio.insecure_channel(args.ratelimit) as rl:
        result = await reconcile(AdminApi(router, key), RateLimitCounters(rl),
                                 tolerance_nano_usd=args.tolerance_nano_usd, fix=args.fix)
    print(result.to_json() if args.json else result.render_text())
    # Non-zero when the books disagree, so a cron job or CI step can alert on it.
    return 1 if result.differences else 0


# --- A/B experiments -------------------------------------------------------------------------

# The unit a metric's values are in, by its label (ops.enums); rates have none.
_METRIC_UNIT = {"latency": "ms", "cost": "nano-USD"}


def _metric_name(metric: int) -> str:
    name = enums.label(admin_pb2.ExperimentMetric, metric).replace("_", " ")
    return f"{name} {_METRIC_UNIT[name]}" if name in _METRIC_UNIT else name


def parse_variant(text: str) -> admin_pb2.ExperimentVariant:
    """``name=model[:weight]`` (weight 1 when left out; a model name may itself contain ':')."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=MODEL[:WEIGHT]")
    model, colon, weight = rest.rpartition(":")
    try:
        return admin_pb2.ExperimentVariant(name=name, model=model, weight=float(weight)) if colon else \
            admin_pb2.ExperimentVariant(name=name, model=rest, weight=1.0)
    except ValueError:
        return admin_pb2.ExperimentVariant(name=name, model=rest, weight=1.0)


def _print_experiment(e: Any) -> None:
    state = "active" if e.active else f"ended {_dt(e.ended_at):%Y-%m-%d %H:%M}"
    total = sum(v.weight for v in e.variants) or 1.0
    split = ", ".join(f"{v.name}={v.model} ({v.weight / total:.0%})" for v in e.variants)
    print(f"{e.name:<24} {e.model:<20} {state:<22} {split}")


async def _experiment_create(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        resp = await api.call("CreateExperiment", admin_pb2.CreateExperimentRequest(
            name=args.name, model=args.model, variants=args.variant))
        _print_experiment(resp.experiment)
        print(f"requests for {args.model!r} are split by user id from now on (every router within seconds); "
              f"the first variant ({args.variant[0].name}) is the control")
        return 0

    return await _with_admin(args, body)


async def _experiment_end(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        resp = await api.call("EndExperiment", admin_pb2.EndExperimentRequest(name=args.name))
        _print_experiment(resp.experiment)
        return 0

    return await _with_admin(args, body)


async def _experiment_list(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        resp = await api.call("ListExperiments", admin_pb2.ListExperimentsRequest(active_only=args.active))
        print(f"{'name':<24} {'model':<20} {'state':<22} variants")
        for e in resp.experiments:
            _print_experiment(e)
        return 0

    return await _with_admin(args, body)


async def _experiment_report(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        r = await api.call("GetExperimentReport", admin_pb2.GetExperimentReportRequest(name=args.name,
                                                                                       alpha=args.alpha))
        _print_experiment(r.experiment)
        print()
        print(f"{'variant':<16} {'model':<20} {'requests':>9} {'p50 ms':>8} {'mean ms':>9} {'mean cost':>12} "
              f"{'errors':>8} {'feedback':>9} {'up-rate':>8}")
        for v in r.variants:
            print(f"{v.variant:<16} {v.model:<20} {v.requests:>9} {v.latency_p50_ms:>8.0f} {v.latency_mean_ms:>9.1f} "
                  f"{v.cost_mean_nano_usd:>12.0f} {v.error_rate:>8.2%} {v.feedback_up + v.feedback_down:>9} "
                  f"{v.feedback_up_rate:>8.2%}")
        print()
        print(f"each variant against the control; significant when p < {r.alpha:g} / {len(r.comparisons)} "
              f"= {r.corrected_alpha:.4g} (Bonferroni)")
        for c in r.comparisons:
            p = f"{c.p_value:.4g}" if c.HasField("p_value") else "n/a (too little data)"
            verdict = "SIGNIFICANT" if c.significant else "-"
            print(f"{c.variant:<16} {_metric_name(c.metric):<17} {c.control_value:>12.4g} -> "
                  f"{c.variant_value:<12.4g} {c.test:<17} p = {p:<22} {verdict}")
        return 0

    return await _with_admin(args, body)


# --- ledger dead letters --------------------------------------------------------------------

_REPLAY_FAILED = (admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_REFUSED, admin_pb2.DEAD_LETTER_REPLAY_OUTCOME_NOT_FOUND)


def _outcome_name(outcome: int) -> str:
    """``inserted``, ``already in ledger``; a failure in capitals (``REFUSED``, ``NOT FOUND``) to stand out."""
    name = enums.label(admin_pb2.DeadLetterReplayOutcome, outcome).replace("_", " ")
    return name.upper() if outcome in _REPLAY_FAILED else name


async def _dead_letters_list(args: argparse.Namespace) -> int:
    async def body(api: AdminApi) -> int:
        shown, token, total = 0, "", 0
        if not args.json:
            print(f"{'id':<17} {'request id':<34} {'tries':>5} {'set aside (UTC)':<19}  reason")
        while shown < args.limit:
            resp = await api.call("ListDeadLetters", admin_pb2.ListDeadLettersRequest(
                page_size=min(args.limit - shown, 1000), page_token=token))
            total = resp.total
            for d in resp.dead_letters:
                when = f"{_dt(d.dead_time):%Y-%m-%d %H:%M:%S}" if d.HasField("dead_time") else "-"
                if args.json:
                    print(json.dumps({"id": d.id, "request_id": d.request_id, "reason": d.reason,
                                      "attempts": d.attempts, "dead_time": when, "source_entry_id": d.source_entry_id,
                                      "event_json": d.event_json}))
                else:
                    print(f"{d.id:<17} {d.request_id or '-':<34} {d.attempts:>5} {when:<19}  {d.reason}")
                    if args.events:
                        print(f"    event: {d.event_json}")
            shown += len(resp.dead_letters)
            token = resp.next_page_token
            if not token:
                break
        if not args.json:
            print(f"{total} dead letter(s) in all" + (f", {shown} shown" if shown < total else ""))
        # Non-zero while any exist, so a cron job or CI step can alert on it.
        return 1 if total else 0

    return await _with_admin(args, body)


def _repaired_event(args: argparse.Namespace) -> str:
    path: Path | None = args.event_file
    if path is None:
        return ""
    if len(args.ids) != 1:
        raise CliError("--event-file repairs exactly one dead letter: give its id")
    text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except ValueError as exc:
        raise CliError(f"{path}: not JSON ({exc})") from None
    return text.strip()


async def _dead_letters_replay(args: argparse.Namespace) -> int:
    if bool(args.ids) == args.all:
        raise CliError("give the ids to replay, or --all")
    repaired = _repaired_event(args)

    async def body(api: AdminApi) -> int:
        resp = await api.call("ReplayDeadLetters", admin_pb2.ReplayDeadLettersRequest(
            ids=args.ids, all=args.all, repaired_event_json=repaired))
        for r in resp.results:
            outcome = _outcome_name(r.outcome)
            extra = f": {r.reason} (now {r.new_id})" if r.reason else ""
            print(f"{r.id:<17} {r.request_id or '-':<34} {outcome}{extra}")
        failed = sum(1 for r in resp.results if r.outcome in _REPLAY_FAILED)
        print(f"{len(resp.results) - failed} replayed, {failed} not; {resp.remaining} dead letter(s) left")
        return 1 if failed else 0

    return await _with_admin(args, body)


DEAD_LETTERS_HELP = ("Usage events the ledger writer could not write: malformed entries, or rows PostgreSQL "
                     "refused, with the reason (error class, SQLSTATE, column; never the values). They wait in "
                     "the Redis stream <prefix>usage:dead; while any do, the router's health reports "
                     "tollgate.router.v1.Ledger NOT_SERVING. 'replay' inserts them into the ledger again "
                     "(a request already there is not written twice) and removes each once its row is "
                     "committed; --event-file replaces one entry's event with a repaired one (same request id).")


# --- wiring ----------------------------------------------------------------------------------

def _connection_args(p: argparse.ArgumentParser, *, ratelimit: bool = False) -> None:
    p.add_argument("--router", default=os.environ.get("TOLLGATE_ROUTER_ADDRESS", DEFAULT_ROUTER),
                   help="router address (env TOLLGATE_ROUTER_ADDRESS; default %(default)s)")
    p.add_argument("--admin-key-file", type=Path,
                   help="file holding an admin key (default: the TOLLGATE_ADMIN_KEY environment variable)")
    if ratelimit:
        p.add_argument("--ratelimit", default=os.environ.get("TOLLGATE_ROUTER_RATELIMIT_TARGET", DEFAULT_RATELIMIT),
                       help="ratelimit service address (env TOLLGATE_ROUTER_RATELIMIT_TARGET; default %(default)s)")


def _run(command: Callable[[argparse.Namespace], Awaitable[int] | int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            result = command(args)
            return result if isinstance(result, int) else asyncio.run(_awaited(result))
        except CliError as exc:
            print(f"tollgate: {exc}", file=sys.stderr)
            return 2
        except grpc.aio.AioRpcError as exc:
            error = domain_error_from_rpc(exc)
            fields = "".join(f"\n  {v.field}: {v.description}" for v in getattr(error, "violations", []))
            print(f"tollgate: {exc.code().name}: {exc.details()}{fields}", file=sys.stderr)
            return 2

    return run


async def _awaited(result: Awaitable[int]) -> int:
    return await result


KEY_HELP = ("Virtual keys (org > team > key). A key is shown once, at creation, and stored only as its "
            "SHA-256 digest: keys are 256 random bits, so a leaked digest cannot be brute-forced, and salts or "
            "slow password hashes (bcrypt, argon2), which protect guessable human passwords, would only slow "
            "down every request.")


EXPERIMENT_HELP = ("A/B experiments. An experiment splits the requests for one model name between variants, each "
                   "served by its own model: a user (GenerationInput.user_id, else the key id) is assigned by "
                   "sha256(experiment:user), so keeps the same variant. The report compares each variant with "
                   "the first (the control): latency and cost with Welch's t-test, error rate and feedback "
                   "up-rate with a two-proportion z-test, Bonferroni-corrected over all comparisons.")


def register(sub: Any) -> None:
    """Add the admin subcommands to ``tollgate``'s subparsers."""
    key = sub.add_parser("key", help="create, revoke and list virtual keys", description=KEY_HELP)
    key_sub = key.add_subparsers(dest="key_command", required=True)
    create = key_sub.add_parser("create", help="create a key (printed once)", description=KEY_HELP)
    _connection_args(create)
    create.add_argument("--org", required=True, help="org id")
    create.add_argument("--team", required=True, help="team id (must belong to the org)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=sorted(enums.labels(admin_pb2.KeyRole)), default="member",
                        help="admin keys may call AdminService; members only generate (default %(default)s)")
    create.add_argument("--tier", choices=enums.labels(admin_pb2.KeyTier), default="pro",
                        help="service tier: under overload free traffic is shed first, then pro "
                             "(default %(default)s)")
    create.add_argument("--model", action="append", help="allowed model (repeat); default: every model")
    create.add_argument("--expires-in-days", type=float, default=0.0)
    create.set_defaults(func=_run(_key_create))
    revoke = key_sub.add_parser("revoke", help="revoke a key (every router rejects it within 1 s)")
    _connection_args(revoke)
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_run(_key_revoke))
    listing = key_sub.add_parser("list", help="list keys (never their secrets)")
    _connection_args(listing)
    listing.add_argument("--org")
    listing.add_argument("--team")
    listing.set_defaults(func=_run(_key_list))

    audit = sub.add_parser("audit", help="recent control-plane changes: who, what, before and after")
    _connection_args(audit)
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--target", help="only this target (key id, model, 'team:<id>', ...)")
    audit.add_argument("--action", help="only this action (create_key, revoke_key, set_price, ...)")
    audit.set_defaults(func=_run(_audit))

    report = sub.add_parser("report", help="render a cost report as a self-contained HTML page",
                            description="Spend by team and model over time, cache savings and the top keys, "
                                        "from the usage ledger, with charts embedded in one HTML file.")
    _connection_args(report)
    report.add_argument("--out", type=Path, default=Path("report.html"), help="output file (default %(default)s)")
    report.add_argument("--days", type=int, default=30, help="days up to --end (default %(default)s)")
    report.add_argument("--start", help="first day, YYYY-MM-DD (UTC)")
    report.add_argument("--end", help="last day, YYYY-MM-DD (UTC), inclusive; default today")
    report.add_argument("--top", type=int, default=10, help="how many keys to list (default %(default)s)")
    report.set_defaults(func=_run(_report))

    rec = sub.add_parser("reconcile", help="compare ledger totals with the ratelimit service's spend counters",
                         description="For every scope with a budget counter, compares the ledger's cost for the "
                                     "current UTC day and month with the ratelimit service's committed spend "
                                     "(reservations in flight shown apart) and lists differences. Exits 1 when "
                                     "any differs by more than the tolerance.")
    _connection_args(rec, ratelimit=True)
    rec.add_argument("--tolerance-nano-usd", type=int, default=0,
                     help="ignore differences up to this (in-flight requests); default %(default)s")
    rec.add_argument("--json", action="store_true", help="machine-readable output")
    rec.add_argument("--fix", action="store_true",
                     help="raise counters that are below the ledger to it (never lowers one; the exit code still "
                          "says there were differences)")
    rec.set_defaults(func=_run(_reconcile))

    experiment = sub.add_parser("experiment", help="A/B experiments: split a model's requests between variants",
                                description=EXPERIMENT_HELP)
    exp_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    exp_create = exp_sub.add_parser("create", help="start an experiment", description=EXPERIMENT_HELP)
    _connection_args(exp_create)
    exp_create.add_argument("name", help="lowercase letters, digits, '_', '.', '-'; never reused")
    exp_create.add_argument("--model", required=True, help="the requested model name to split (e.g. auto)")
    exp_create.add_argument("--variant", action="append", required=True, type=parse_variant,
                            metavar="NAME=MODEL[:WEIGHT]",
                            help="a variant and its weight (repeat, 2 to 10; the first is the control)")
    exp_create.set_defaults(func=_run(_experiment_create))
    exp_end = exp_sub.add_parser("end", help="stop an experiment (its report stays readable)")
    _connection_args(exp_end)
    exp_end.add_argument("name")
    exp_end.set_defaults(func=_run(_experiment_end))
    exp_list = exp_sub.add_parser("list", help="list experiments, newest first")
    _connection_args(exp_list)
    exp_list.add_argument("--active", action="store_true", help="only active experiments")
    exp_list.set_defaults(func=_run(_experiment_list))
    exp_report = exp_sub.add_parser("report", help="per-variant metrics and significance tests")
    _connection_args(exp_report)
    exp_report.add_argument("name")
    exp_report.add_argument("--alpha", type=float, default=0.05, help="family-wise level (default %(default)s)")
    exp_report.set_defaults(func=_run(_experiment_report))

    dead = sub.add_parser("dead-letters", help="usage events the ledger refused: list and replay them",
                          description=DEAD_LETTERS_HELP)
    dead_sub = dead.add_subparsers(dest="dead_letters_command", required=True)
    dead_list = dead_sub.add_parser("list", help="list dead letters, oldest first (exit 1 while any exist)",
                                    description=DEAD_LETTERS_HELP)
    _connection_args(dead_list)
    dead_list.add_argument("--limit", type=int, default=100, help="show at most this many (default %(default)s)")
    dead_list.add_argument("--events", action="store_true", help="also print each stored event (JSON)")
    dead_list.add_argument("--json", action="store_true", help="one JSON object per line")
    dead_list.set_defaults(func=_run(_dead_letters_list))
    dead_replay = dead_sub.add_parser("replay", help="insert dead letters into the ledger again",
                                      description=DEAD_LETTERS_HELP)
    _connection_args(dead_replay)
    dead_replay.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (from 'list')")
    dead_replay.add_argument("--all", action="store_true", help="every dead letter there is now")
    dead_replay.add_argument("--event-file", type=Path, metavar="FILE",
                             help="a repaired event (JSON; '-' reads stdin) for the one ID given")
    dead_replay.set_defaults(func=_run(_dead_letters_replay))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tollgate", description="tollgate admin commands")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
