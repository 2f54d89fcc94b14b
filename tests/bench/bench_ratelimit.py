"""Rate limiter benchmark: decisions per second and Reserve latency, inside the service and over gRPC.

Measured in one run, side by side:
- baseline: a Redis PING and a trivial EVALSHA from the same client (the floor of any Redis decision);
- inside the service: the domain ``Limiter.reserve`` against real Redis, with 4 levels checked
  (key, team, org, global: 6 token buckets), then the same plus 6 budgets (daily + monthly at
  org, team, key); one event loop (uvloop), as one service process runs it;
- over gRPC: ``RateLimitService.Reserve`` on a real ``python -m services.ratelimit`` process
  (limits from PostgreSQL), called from this process.
Latency is per call at the given concurrency (c=1: one call at a time); decisions/s is calls
completed per second of wall time. Limits are set high: every call is a full check-and-debit.

Redis and PostgreSQL: TOLLGATE_REDIS_URL / TOLLGATE_DATABASE_URL (or --redis-url/--database-url)
when set, else private ones started for the run (as ``tollgate up`` does). Prints a markdown table;
``--write`` puts it into docs/benchmarks.md between markers.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.bench import load

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "router" / "migrations"
HUGE = 10**12


# Redis scripts and connections warm up over a few hundred calls; keep them out of the numbers.
measure = functools.partial(load.measure, warmup=200)


def row(path: str, c: int, r: dict[str, float]) -> str:
    return f"| {path} | {c} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['per_s']:,.0f} |"


@contextmanager
def backends(redis_url: str, database_url: str) -> Iterator[tuple[str, str]]:
    from ops.launcher import LocalPostgres, LocalRedis

    with tempfile.TemporaryDirectory(prefix="tollgate-bench-rl-") as tmp:
        local_redis = local_pg = None
        try:
            if not redis_url:
                local_redis = LocalRedis(Path(tmp) / "redis")
                redis_url = local_redis.start()
            if not database_url:
                local_pg = LocalPostgres(Path(tmp) / "pg")
                database_url = local_pg.start()
            yield redis_url, database_url
        finally:
            if local_pg is not None:
                local_pg.stop()
            if local_redis is not None:
                local_redis.stop()


async def bench_in_process(redis_url: str, prefix: str, concurrencies: list[int], total: int) -> list[str]:
    import redis.asyncio as aioredis

    from services.ratelimit.limiter import Limiter
    from services.ratelimit.limits import Budgets, Limits, Scope, StaticLimitStore, Subject

    client = aioredis.Redis.from_url(redis_url)
    rows = {(Scope.KEY, "k1"): Limits(requests_per_minute=HUGE, tokens_per_minute=HUGE),
            (Scope.TEAM, "t1"): Limits(tokens_per_minute=HUGE),
            (Scope.ORG, "o1"): Limits(tokens_per_minute=HUGE, tokens_per_day=HUGE),
            (Scope.GLOBAL, "*"): Limits(requests_per_minute=HUGE)}
    budgets = {(s, i): Budgets(HUGE, HUGE) for s, i in ((Scope.KEY, "k1"), (Scope.TEAM, "t1"), (Scope.ORG, "o1"))}
    plain = Limiter(client, StaticLimitStore(rows), prefix=prefix, redis_timeout_s=5)
    budgeted = Limiter(client, StaticLimitStore(rows, budgets=budgets), prefix=prefix + "b:", redis_timeout_s=5)
    subject = Subject("o1", "t1", "k1")
    trivial = client.register_script("return 1")
    out: list[str] = []
    try:
        async def ping(_: int) -> object:
            return await client.ping()

        async def evalsha(_: int) -> object:
            return await trivial()

        # A fresh request id per call, as the router sends: a repeated id would be an idempotent replay.
        async def reserve(_: int) -> object:
            return await plain.reserve(subject, 500, request_id=uuid.uuid4().hex)

        async def reserve_budgets(_: int) -> object:
            return await budgeted.reserve(subject, 500, estimated_cost_nano_usd=1_000, request_id=uuid.uuid4().hex)

        async def reserve_then_commit(i: int) -> object:
            res = await budgeted.reserve(subject, 500, estimated_cost_nano_usd=1_000, request_id=uuid.uuid4().hex)
            return await budgeted.commit(res.reservation_id, 300, actual_cost_nano_usd=700)

        for c in concurrencies:
            out.append(row("baseline: Redis PING", c, await measure(ping, c, total)))
            out.append(row("baseline: EVALSHA `return 1`", c, await measure(evalsha, c, total)))
            out.append(row("Limiter.reserve, 4 levels (6 buckets)", c, await measure(reserve, c, total)))
            out.append(row("Limiter.reserve, 4 levels + 6 budgets", c, await measure(reserve_budgets, c, total)))
            out.append(row("reserve + commit, 4 levels + 6 budgets (per pair)", c,
                           await measure(reserve_then_commit, c, total // 2)))
    finally:
        await plain.aclose()
        await budgeted.aclose()
        await client.aclose()
    return out


async def prepare_database(database_url: str, ids: tuple[str, str, str]) -> None:
    import asyncpg

    from libs.pg_migrations import migrate

    org, team, key = ids
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, MIGRATIONS)
        await conn.executemany(
            "INSERT INTO limits (scope, scope_id, requests_per_minute, tokens_per_minute, tokens_per_day)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (scope, scope_id) DO NOTHING",
            [("key", key, HUGE, HUGE, 0), ("team", team, 0, HUGE, 0), ("org", org, 0, HUGE, HUGE)])
        await conn.executemany(
            "INSERT INTO budgets (scope, scope_id, daily_nano_usd, monthly_nano_usd) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (scope, scope_id) DO NOTHING", [("key", key, HUGE, HUGE), ("team", team, HUGE, HUGE),
                                                           ("org", org, HUGE, HUGE)])
    finally:
        await conn.close()


async def cleanup_database(database_url: str, ids: tuple[str, str, str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        for table in ("limits", "budgets"):
            await conn.execute(f"DELETE FROM {table} WHERE scope_id = ANY($1::text[])", list(ids))
    finally:
        await conn.close()


async def bench_grpc(address: str, ids: tuple[str, str, str], concurrencies: list[int], total: int) -> list[str]:
    import grpc
    from tollgate.common.v1 import common_pb2
    from tollgate.ratelimit.v1 import ratelimit_pb2, ratelimit_pb2_grpc

    org, team, key = ids
    out: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ratelimit_pb2_grpc.RateLimitServiceStub(channel)
        subject = ratelimit_pb2.Subject(principal=common_pb2.Principal(org_id=org, team_id=team, key_id=key))
        deadline = time.monotonic() + 15
        while True:  # limits arrive from PostgreSQL within the refresh interval
            usage = await stub.GetUsage(ratelimit_pb2.GetUsageRequest(subject=subject), timeout=5)
            if len(usage.usages) >= 10:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"limits not loaded: {usage}")
            await asyncio.sleep(0.1)

        async def reserve(_: int) -> object:
            return await stub.Reserve(ratelimit_pb2.ReserveRequest(
                subject=subject, request_id=uuid.uuid4().hex, estimated_tokens=500, estimated_cost_nano_usd=1_000),
                timeout=5)

        for c in concurrencies:
            out.append(row("gRPC Reserve round trip (service process), 4 levels + 6 budgets", c,
                           await measure(reserve, c, total)))
    return out


def run(args: argparse.Namespace) -> str:
    import uvloop

    from tests.support.infra import delete_redis_prefix, free_port
    from tests.support.procs import ServiceProcess

    concurrencies = [int(c) for c in args.concurrency.split(",")]
    redis_url = args.redis_url or os.environ.get("TOLLGATE_REDIS_URL", "")
    database_url = args.database_url or os.environ.get("TOLLGATE_DATABASE_URL", "")
    run_id = uuid.uuid4().hex[:8]
    prefix = f"tgbench:{run_id}:"
    ids = (f"bench-org-{run_id}", f"bench-team-{run_id}", f"bench-key-{run_id}")
    with backends(redis_url, database_url) as (redis_url, database_url):
        try:
            rows = uvloop.run(bench_in_process(redis_url, prefix, concurrencies, args.requests))
            uvloop.run(prepare_database(database_url, ids))
            with tempfile.TemporaryDirectory(prefix="tollgate-bench-rl-logs-") as logs:
                port = free_port()
                proc = ServiceProcess("ratelimit", port, {
                    "TOLLGATE_RATELIMIT_PORT": str(port), "TOLLGATE_REDIS_URL": redis_url,
                    "TOLLGATE_REDIS_PREFIX": prefix + "g:", "TOLLGATE_DATABASE_URL": database_url,
                    "TOLLGATE_RATELIMIT_LIMITS_REFRESH_S": "0.5", "TOLLGATE_LOG_LEVEL": "WARNING",
                    "TOLLGATE_RATELIMIT_REDIS_TIMEOUT_S": "5"}, Path(logs)).wait_ready()
                try:
                    rows += uvloop.run(bench_grpc(proc.address, ids, concurrencies, args.requests))
                finally:
                    proc.stop()
        finally:
            uvloop.run(cleanup_database(database_url, ids))
            uvloop.run(delete_redis_prefix(redis_url, prefix))
    cmd = f"python -m tests.bench.bench_ratelimit --requests {args.requests} --concurrency {args.concurrency}"
    given = bool(args.redis_url or os.environ.get("TOLLGATE_REDIS_URL"))
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "pure-Python parser (no hiredis)"
    return "\n".join([
        "## Rate limiter: decisions per second and Reserve latency",
        "",
        f"Command: `{cmd}`. Machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, redis-py with {parser}; "
        f"Redis {'given' if given else 'private (appendonly)'}. "
        "4 levels = key (RPM+TPM), team (TPM), org (TPM+TPD), global (RPM); budgets = daily + monthly at org, "
        "team, key. In-process rows: one event loop, as in one service process. gRPC rows: the client "
        "runs in the benchmark process on the same cores. Target: p99 <= 1 ms and >= 5,000 decisions/s "
        "per process.",
        "",
        "| path | concurrency | p50 ms | p99 ms | decisions/s |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="calls per measurement")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    section = run(args)
    print(section)
    if args.write:
        from tests.bench.run import write_section

        write_section("bench:bench_ratelimit", section)
    sys.exit(0)


if __name__ == "__main__":
    main()
