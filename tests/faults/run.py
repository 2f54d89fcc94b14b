"""``make faults``: every row of the fault table in full (40 s of load, a 20 s hang), on a mesh with two
inference replicas, then the single-replica kill on a mesh of its own; prints the table and, with
``--write``, records it in docs/benchmarks.md. ``--short`` runs the timing ``make test`` uses."""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
from pathlib import Path

from tests.bench.run import write_section
from tests.faults.harness import (
    FAULTS,
    FULL,
    SHORT,
    SINGLE_REPLICA_FAULT,
    RowResult,
    Timing,
    baseline_p99,
    describe,
    fault_mesh,
    run_row,
    table,
    verdict,
    verdict_single_replica,
)

MARK = "faults"

# Issue 24's measurement of the mesh before this work (same method: `tollgate up` with the fake provider,
# 4 keep-alive HTTP clients at 12 requests/s each for 40 s, 20 % repeated prompts, one fault at t = 10 s).
BEFORE = """| fault | served | what happened |
|---|---:|---|
| none | 100 % | p50/p99 13.6/33.4 ms |
| SIGKILL cache, ratelimit, retrieval or inference | 25 % | the launcher exits 0.7-1.0 s after the kill and stops every service; nothing restarts |
| SIGSTOP PostgreSQL 20 s | 100 % | every request takes about 2.0 s while it hangs: 49 requests in 20 s instead of about 960 |
| SIGSTOP ratelimit 20 s | 100 % | every request takes about 0.5 s for the whole 20 s; the breaker never opens; a key limited to 12 requests/min got 40 of 40 through |
| SIGSTOP cache 20 s | 100 % | 0.5 s per request for 9.6 s until the breaker opens |
| SIGSTOP inference 20 s | 100 % | requests in flight hang the full 20 s; no timeout, failover or shedding; the router logs nothing |
| SIGKILL Redis, restarted after 10 s | 100 % | a limited key got 33 of 121 through, against 19 without the fault |
| PostgreSQL fast restart | 100 % | fine; asyncpg pool tracebacks logged as warnings |"""  # noqa: E501


def _rows(data_dir: Path, timing: Timing, names: list[str]) -> tuple[list[RowResult], list[RowResult]]:
    chosen = [f for f in FAULTS if not names or any(n.lower() in f.name.lower() for n in names)]
    rows: list[RowResult] = []
    # The mesh starts outside the event loop (the launcher runs its own) and on this thread, which outlives it.
    if chosen:
        with fault_mesh(data_dir / "two-replicas", replicas=2) as fm:
            for fault in chosen:
                row = asyncio.run(run_row(fm, fault, timing))
                print(describe(row), flush=True)
                rows.append(row)
    single: list[RowResult] = []
    if not names or any(n.lower() in SINGLE_REPLICA_FAULT.name.lower() for n in names):
        with fault_mesh(data_dir / "one-replica", replicas=1) as fm:
            row = asyncio.run(run_row(fm, SINGLE_REPLICA_FAULT, timing))
            print(describe(row), flush=True)
            single.append(row)
    return rows, single


def _single_line(r: RowResult) -> str:
    refused = [s for s in r.samples if not s.served and not s.limited_key]
    slowest = max((s.latency for s in refused), default=0.0)
    problems = verdict_single_replica(r)
    return (f"- **{r.fault.name}**: {r.served}/{r.requests} served, {len(refused)} refused (slowest refusal "
            f"{slowest * 1000:.0f} ms); {'pass' if not problems else 'FAIL: ' + '; '.join(problems)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="the shortened timing of `make test`")
    parser.add_argument("--rows", default="", help="comma-separated parts of row names to run (default: all)")
    parser.add_argument("--write", action="store_true", help="record the table in docs/benchmarks.md")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the meshes' data and logs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    timing = SHORT if args.short else FULL
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if args.data_dir is not None:
        rows, single = _rows(args.data_dir, timing, names)
    else:
        with tempfile.TemporaryDirectory(prefix="tollgate-faults-") as tmp:
            rows, single = _rows(Path(tmp), timing, names)
    base = baseline_p99(rows)
    after = table(rows, base)
    single_lines = [_single_line(r) for r in single]
    command = "make faults" if not args.short else "python -m tests.faults.run --short"
    section = "\n".join([
        "## Faults: one part killed or hung under load (issue 24)", "",
        f"Command: `{command}` ({platform.machine()}, 2 cores). A mesh from the launcher with its supervisor, "
        "private Redis and PostgreSQL, the fake OpenAI-style provider, two inference replicas; "
        f"{timing.http_clients} keep-alive HTTP clients and {timing.grpc_clients} gRPC client (with retrieval) at "
        f"{timing.rate_per_client:g} requests/s each, {timing.repeat_share:.0%} repeated prompts, and a key limited "
        f"to its rpm sending {timing.limited_rate:g} requests/s; the fault at t = {timing.fault_at_s:g} s, a hang "
        f"lasting {timing.hang_s:g} s; load until {timing.recover_s + timing.post_s:g} s after the fault ended (a "
        "killed part: when it serves again). Served = 2xx / OK (a degraded answer counts). "
        f"The bar: served >= 99.9 %, p99 of the requests sent during the fault under 1 s, the limited key within "
        "its limit (a token bucket: limit + limit x T / 60 over the T seconds it sent; for the Redis kill, plus "
        "what it sent in the last second, which Redis's append-only file may not hold yet), every served request "
        "id in the ledger, and p99 back to normal (3x the fault-free p99, at "
        f"least 250 ms) from {timing.recover_s:g} s after the fault ended.", "",
        "### After", "", after, "", *single_lines, "",
        "### Before (issue 24's measurement)", "", BEFORE, ""])
    print(section)
    if args.write:
        write_section(MARK, section)
    failed = any(verdict(r, base) for r in rows) or any(verdict_single_replica(r) for r in single)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
