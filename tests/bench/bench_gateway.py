"""``make bench-gateway``: tollgate's HTTP edge side by side with the LiteLLM proxy, in one run, on loopback.

- Upstream: nginx answering a fixed chat completion (JSON for LiteLLM, the SSE stream tollgate's
  OpenAI-style engine always asks for; same text, same usage), started under a temp folder.
- LiteLLM proxy (its own venv under .tollgate/bench/litellm-venv, installed once): 2 workers, no database,
  no cache, one model on the nginx JSON path, a master key checked on every request.
- tollgate: the mesh as ``tollgate up`` runs it (private Redis/PostgreSQL), inference on its OpenAI-style
  HTTP engine against the nginx SSE path, a member key with RPM/TPM/TPD limits and budgets at key, team
  and org (every request reserves and commits at each level), exact cache on, ledger writer on.
- Load: wrk for every HTTP target, one Lua script (same body, same headers, same settings), at each
  connection count: nginx direct (the floor), LiteLLM (unique prompts), tollgate miss (unique prompts),
  tollgate exact hit (one prompt, warmed first). Targets run one after another, never concurrently.
- The gRPC path: a grpc.aio closed-loop client (tests/bench/load.py) at the same concurrencies:
  InferenceService.Generate direct (the baseline), RouterService.Generate miss and exact hit.

Prints a markdown report; with --write, replaces the ``bench:gateway-http`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ops.launcher import REPO_ROOT, LauncherSettings, Mesh, free_port
from tests.bench import gateway_harness as gh
from tests.bench.load import measure
from tests.bench.run import write_section

MODEL = "bench-model"
MARK = "bench:gateway-http"
SERVICES = ("router", "cache", "ratelimit", "retrieval", "inference")
# Generous: the limits must never bite, but every level must hold a limit so each request reserves/commits.
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 1_000_000_000, "tokens_per_day": 100_000_000_000}
BUDGET_NANO_USD = 10**15


@dataclass
class Row:
    path: str
    target: str
    connections: int
    p50_ms: float
    p99_ms: float
    per_s: float
    requests: int
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def error_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) if self.errors else "0"


# ------------------------------------------------------------------------------------------ tollgate


@dataclass
class Tollgate:
    """The mesh, a member key with limits and budgets, and the HTTP edge (started by the launcher when it
    knows about it, else here)."""

    root: Path
    upstream_sse_url: str
    mesh: Mesh | None = None
    admin_key: str = ""
    key: str = ""
    key_id: str = ""
    edge_port: int = 0
    edge_proc: subprocess.Popen[bytes] | None = None
    edge_note: str = ""

    @property
    def inference_address(self) -> str:
        assert self.mesh is not None
        return f"{self.mesh.settings.host}:{self.mesh.settings.inference_port}"

    @property
    def edge_base(self) -> str:
        return f"http://127.0.0.1:{self.edge_port}"

    def start(self) -> Tollgate:
        from ops.cli import start_mesh

        update: dict[str, object] = {f"{n}_port": free_port() for n in SERVICES}
        update.update({"inference_engine": "openai", "inference_models": f"{MODEL}={gh.UPSTREAM_MODEL}",
                       "provider_base_url": self.upstream_sse_url})
        launcher_has_edge = "edge_port" in LauncherSettings.model_fields
        if launcher_has_edge:
            self.edge_port = free_port()
            update["edge_port"] = self.edge_port
        settings = LauncherSettings(data_dir=self.root / "mesh", redis_url="", database_url="",
                                    fake_provider_port=free_port()).model_copy(update=update)
        os.environ["TOLLGATE_LOG_LEVEL"] = "WARNING"
        self.mesh, admin_key = start_mesh(settings)
        assert admin_key, "a fresh mesh returns its bootstrap admin key"
        self.admin_key = admin_key
        asyncio.run(self._member_key())
        if launcher_has_edge:
            self.edge_note = "started by the launcher (`tollgate up`)"
        elif importlib.util.find_spec("services.edge.server") is not None:
            self._spawn_edge()
            self.edge_note = "started by this harness (`python -m services.edge`): the launcher does not start it yet"
        else:
            self.edge_port = 0
            self.edge_note = "not measured: services/edge is not in this checkout"
            return self
        gh.wait_http(f"{self.edge_base}/healthz", 60, self.edge_proc)
        return self

    def _spawn_edge(self) -> None:
        assert self.mesh is not None
        self.edge_port = free_port()
        log_path = self.root / "mesh" / "logs" / "edge.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.mesh.env, "TOLLGATE_EDGE_PORT": str(self.edge_port),
               "TOLLGATE_EDGE_ROUTER_TARGET": self.mesh.router_address}
        log = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        self.edge_proc = subprocess.Popen([sys.executable, "-m", "services.edge"], cwd=REPO_ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    async def _member_key(self) -> None:
        import grpc
        from tollgate.common.v1 import common_pb2
        from tollgate.router.v1 import admin_pb2, admin_pb2_grpc

        assert self.mesh is not None
        md = (("authorization", f"Bearer {self.admin_key}"),)
        async with grpc.aio.insecure_channel(self.mesh.router_address) as ch:
            admin = admin_pb2_grpc.AdminServiceStub(ch)
            p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
            created = await admin.CreateKey(admin_pb2.CreateKeyRequest(
                org_id=p.org_id, team_id=p.team_id, name="bench-gateway", role=admin_pb2.KEY_ROLE_MEMBER),
                metadata=md)
            self.key, self.key_id = created.key, created.key_id
            for scope, scope_id in ((common_pb2.LIMIT_SCOPE_KEY, created.key_id),
                                    (common_pb2.LIMIT_SCOPE_TEAM, p.team_id), (common_pb2.LIMIT_SCOPE_ORG, p.org_id)):
                await admin.SetLimits(admin_pb2.SetLimitsRequest(scope=scope, scope_id=scope_id, **LIMITS), metadata=md)
                await admin.SetBudget(admin_pb2.SetBudgetRequest(
                    scope=scope, scope_id=scope_id, daily_nano_usd=BUDGET_NANO_USD, monthly_nano_usd=BUDGET_NANO_USD),
                    metadata=md)
        # The limiter reloads limits every 2 s, the router's registry every 2 s.
        await asyncio.sleep(4.5)

    def chat(self, prompt: str) -> dict[str, object]:
        import json

        status, _, body = gh.http_request(
            f"{self.edge_base}/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0},
            {"authorization": f"Bearer {self.key}"})
        if status != 200:
            raise gh.HarnessError(f"edge answered {status}: {body[:500]!r}")
        out: dict[str, object] = json.loads(body)
        return out

    async def ledger_rows(self, settle_s: float = 20.0) -> tuple[int, int, dict[str, int]]:
        """(rows for the bench key, rows with a cost, rows per "cache_tier status"), once the writer catches up."""
        import asyncpg

        assert self.mesh is not None
        conn = await asyncpg.connect(self.mesh.env["TOLLGATE_DATABASE_URL"])
        try:
            deadline, last = time.monotonic() + settle_s, -1
            while True:
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, count(*) FILTER (WHERE cost_nano_usd > 0) AS paid "
                    "FROM usage_ledger WHERE key_id = $1", self.key_id)
                assert row is not None
                if row["n"] == last or time.monotonic() > deadline:
                    groups = await conn.fetch(
                        "SELECT cache_tier || ' ' || status AS k, count(*) AS n FROM usage_ledger WHERE key_id = $1 "
                        "GROUP BY 1 ORDER BY 1", self.key_id)
                    return int(row["n"]), int(row["paid"]), {str(g["k"]): int(g["n"]) for g in groups}
                last = row["n"]
                await asyncio.sleep(2.0)
        finally:
            await conn.close()

    def stop(self) -> None:
        if self.edge_proc is not None and self.edge_proc.poll() is None:
            os.killpg(self.edge_proc.pid, signal.SIGTERM)
            try:
                self.edge_proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.edge_proc.pid, signal.SIGKILL)
        if self.mesh is not None:
            self.mesh.stop()


# ---------------------------------------------------------------------------------------------- gRPC


async def grpc_rows(tg: Tollgate, concurrencies: list[int], total: int) -> tuple[list[Row], int]:
    """Direct InferenceService.Generate vs RouterService.Generate (miss, exact hit); returns the rows and the
    number of router calls made (for the ledger check)."""
    import grpc
    from tollgate.common.v1 import common_pb2
    from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
    from tollgate.router.v1 import router_pb2, router_pb2_grpc

    from tests.bench.run import _messages

    assert tg.mesh is not None
    rows: list[Row] = []
    router_calls = 0
    warmup = min(20, total)
    async with grpc.aio.insecure_channel(tg.mesh.router_address) as rch, \
            grpc.aio.insecure_channel(tg.inference_address) as ich:
        router = router_pb2_grpc.RouterServiceStub(rch)
        inference = inference_pb2_grpc.InferenceServiceStub(ich)
        key_md = (("authorization", f"Bearer {tg.key}"),)
        params = common_pb2.GenerationParams(temperature=0.0, max_output_tokens=16)
        run_id = uuid.uuid4().hex[:8]
        rng = random.Random(run_id)
        hit_input = router_pb2.GenerationInput(model=MODEL, messages=_messages(f"grpc hit {run_id}"), params=params)
        await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md, timeout=10)
        router_calls += 1
        await asyncio.sleep(0.5)  # the answer is stored after the response

        for c in concurrencies:
            async def direct(i: int, c: int = c) -> None:
                async for _ in inference.Generate(inference_pb2.GenerateRequest(
                        request_id=f"b{run_id}-{c}-{i}", model=MODEL,
                        messages=_messages(gh.random_prompt(rng, f"grpc {run_id} {c} {i}")), params=params),
                        timeout=10):
                    pass

            async def miss(i: int, c: int = c) -> None:
                resp = await router.Generate(router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
                    model=MODEL, messages=_messages(gh.random_prompt(rng, f"grpc {run_id} {c} {i}")), params=params)),
                    metadata=key_md, timeout=10)
                if resp.summary.cache_tier != common_pb2.CACHE_TIER_MISS:
                    raise _NotTheTier("not a miss")

            async def hit(i: int) -> None:
                resp = await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md, timeout=10)
                if resp.summary.cache_tier != common_pb2.CACHE_TIER_EXACT:
                    raise _NotTheTier("not an exact hit")

            for name, fn, via_router in (("direct InferenceService (baseline)", direct, False),
                                         ("RouterService, cache miss", miss, True),
                                         ("RouterService, exact hit", hit, True)):
                errors: Counter[str] = Counter()
                r = await measure(_counting(fn, errors), c, total, warmup=warmup)
                router_calls += (total + warmup) if via_router else 0
                rows.append(Row("grpc", name, c, r["p50_ms"], r["p99_ms"], r["per_s"], total, dict(errors)))
                print(_row_line(rows[-1]), flush=True)
    return rows, router_calls


class _NotTheTier(Exception):
    """The router answered from another cache tier than the path measures (counted as an error)."""


def _counting(fn: Callable[[int], Awaitable[None]], errors: Counter[str]) -> Callable[[int], Awaitable[None]]:
    import grpc

    async def call(i: int) -> None:
        try:
            await fn(i)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        except _NotTheTier as exc:
            errors[str(exc)] += 1

    return call


# ---------------------------------------------------------------------------------------------- HTTP


def _row_line(r: Row) -> str:
    return (f"  {r.path:<4} {r.target:<40} c={r.connections:<3} p50 {r.p50_ms:8.2f} ms  p99 {r.p99_ms:8.2f} ms  "
            f"{r.per_s:8.0f}/s  errors {r.error_text}")


def http_rows(targets: list[tuple[str, str, str, str, str]], script: Path, connections: list[int], duration: float,
              warmup_s: float, run_id: str) -> tuple[list[Row], list[str], int]:
    """targets: (name, url, mode, key, model). Interleaved per connection count so drift in the machine's
    load hits every target alike. Returns rows, one example command per target, and the number of requests
    sent to tollgate's edge (warm-ups included, for the ledger check)."""
    rows: list[Row] = []
    commands: dict[str, str] = {}
    edge_requests = 0
    for c in connections:
        for name, url, mode, key, model in targets:
            tag = run_id if mode == "hit" else f"{run_id}-{name.split()[0]}-{c}"
            if warmup_s > 0:
                w = gh.run_wrk(name, url, script, connections=c, duration_s=warmup_s, mode=mode, key=key,
                               model=model, tag=f"{tag}-warm" if mode != "hit" else tag)
                edge_requests += w.requests if "tollgate" in name else 0
            r = gh.run_wrk(name, url, script, connections=c, duration_s=duration, mode=mode, key=key, model=model,
                           tag=tag)
            edge_requests += r.requests if "tollgate" in name else 0
            commands.setdefault(name, r.command)
            rows.append(Row("http", name, c, r.p50_ms, r.p99_ms, r.per_s, r.requests, r.errors))
            print(_row_line(rows[-1]), flush=True)
    return rows, list(commands.values()), edge_requests


# -------------------------------------------------------------------------------------------- report


def _fmt_ms(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _table(rows: list[Row]) -> list[str]:
    out = ["| target | connections | p50 ms | p99 ms | req/s (2xx) | requests | errors |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        err = r.error_text if not r.errors else f"**{r.error_text}**"
        out.append(f"| {r.target} | {r.connections} | {_fmt_ms(r.p50_ms)} | {_fmt_ms(r.p99_ms)} | {r.per_s:,.0f} "
                   f"| {r.requests:,} | {err} |")
    return out


def _find(rows: list[Row], target_prefix: str, c: int) -> Row | None:
    return next((r for r in rows if r.target.startswith(target_prefix) and r.connections == c), None)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def _targets(rows: list[Row], connections: list[int]) -> tuple[list[str], list[str]]:
    """Ratio table tollgate/LiteLLM and the issue's targets with met / not met."""
    ratio = ["| connections | tollgate path | p50 ratio | p99 ratio | throughput ratio |", "|---:|---|---:|---:|---:|"]
    for c in connections:
        lite = _find(rows, "LiteLLM", c)
        for prefix in ("tollgate edge, cache miss", "tollgate edge, exact hit"):
            tg = _find(rows, prefix, c)
            if lite and tg:
                ratio.append(f"| {c} | {prefix.removeprefix('tollgate edge, ')} | {_ratio(tg.p50_ms, lite.p50_ms)} | "
                             f"{_ratio(tg.p99_ms, lite.p99_ms)} | {_ratio(tg.per_s, lite.per_s)} |")

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("**met**" if ok else "**not met**")

    miss1, hit1, lite1 = (_find(rows, p, 1) for p in ("tollgate edge, cache miss", "tollgate edge, exact hit",
                                                      "LiteLLM"))
    miss16, lite16 = _find(rows, "tollgate edge, cache miss", 16), _find(rows, "LiteLLM", 16)
    tg_sat = max((r.per_s for r in rows if r.target.startswith("tollgate edge, cache miss")), default=None)
    lite_sat = max((r.per_s for r in rows if r.target.startswith("LiteLLM")), default=None)
    lines = ["| target | measured | result |", "|---|---|---|"]
    if miss1:
        ok = miss1.p50_ms <= 2.0 and (lite1 is None or miss1.p50_ms <= lite1.p50_ms / 4)
        rel = f", LiteLLM {lite1.p50_ms:.2f} ms (ratio {miss1.p50_ms / lite1.p50_ms:.3f})" if lite1 else ""
        lines.append(f"| miss p50 at 1 connection ≤ 2 ms and ≤ 1/4 of LiteLLM's | {miss1.p50_ms:.2f} ms{rel} | "
                     f"{verdict(ok)}{'' if lite1 else ' (LiteLLM part not measured)'} |")
    else:
        lines.append(f"| miss p50 at 1 connection ≤ 2 ms and ≤ 1/4 of LiteLLM's | - | {verdict(None)} |")
    lines.append(f"| exact-hit p50 ≤ 1 ms (1 connection) | {f'{hit1.p50_ms:.2f} ms' if hit1 else '-'} | "
                 f"{verdict(hit1.p50_ms <= 1.0 if hit1 else None)} |")
    if tg_sat is not None and lite_sat:
        lines.append(f"| saturated throughput (best over connection counts, miss path) ≥ 3x LiteLLM's | "
                     f"{tg_sat:,.0f} vs {lite_sat:,.0f} req/s ({tg_sat / lite_sat:.2f}x) | "
                     f"{verdict(tg_sat >= 3 * lite_sat)} |")
    else:
        lines.append(f"| saturated throughput ≥ 3x LiteLLM's | - | {verdict(None)} |")
    if miss16 and lite16:
        lines.append(f"| p99 at 16 connections ≤ 1/5 of LiteLLM's (miss path) | {miss16.p99_ms:.1f} vs "
                     f"{lite16.p99_ms:.1f} ms (ratio {miss16.p99_ms / lite16.p99_ms:.3f}) | "
                     f"{verdict(miss16.p99_ms <= lite16.p99_ms / 5)} |")
    else:
        lines.append(f"| p99 at 16 connections ≤ 1/5 of LiteLLM's | - | {verdict(None)} |")
    return ratio, lines


def _grpc_table(rows: list[Row]) -> list[str]:
    out = ["| concurrency | path | p50 ms | p99 ms | req/s | p50 vs direct | errors |",
           "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        base = _find(rows, "direct", r.connections)
        rel = "" if r.target.startswith("direct") or base is None else f"{r.p50_ms / base.p50_ms:.2f}x"
        err = r.error_text if not r.errors else f"**{r.error_text}**"
        out.append(f"| {r.connections} | {r.target} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.per_s:,.0f} | {rel} "
                   f"| {err} |")
    return out


def _meminfo_gib() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    return "?"


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded wrk load before each run")
    parser.add_argument("--connections", default="1,4,16,64")
    parser.add_argument("--grpc-requests", type=int, default=600, help="calls per gRPC measurement")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--skip-litellm", action="store_true", help="tollgate and nginx only")
    parser.add_argument("--skip-grpc", action="store_true", help="leave out the gRPC-path measurement")
    args = parser.parse_args()
    connections = [int(c) for c in args.connections.split(",")]

    gh.ensure_tools()
    litellm_exe = None if args.skip_litellm else gh.ensure_litellm()
    versions = {"nginx": gh.nginx_version(), "wrk": gh.wrk_version(),
                "LiteLLM": gh.litellm_version() if litellm_exe else "skipped"}
    load_before = os.getloadavg()
    root = gh.temp_root()
    run_id = uuid.uuid4().hex[:8]
    nginx = gh.Nginx(root / "nginx")
    litellm: gh.LiteLLM | None = None
    tg = Tollgate(root, "")
    http: list[Row] = []
    grpc_: list[Row] = []
    commands: list[str] = []
    ledger: tuple[int, int, dict[str, int]] | None = None
    sent_to_router = 0
    finished = False
    try:
        nginx.start()
        print(f"bench-gateway: nginx on {nginx.base} (answers verified)", flush=True)
        if litellm_exe:
            litellm = gh.LiteLLM(root / "litellm", nginx.json_base_url, MODEL, exe=litellm_exe)
            print("bench-gateway: starting the LiteLLM proxy (2 workers) …", flush=True)
            litellm.launch()  # it imports for a long while: the mesh starts meanwhile
        print("bench-gateway: starting the tollgate mesh …", flush=True)
        tg.upstream_sse_url = nginx.sse_base_url
        tg.start()
        print(f"bench-gateway: tollgate up; edge {tg.edge_note}", flush=True)
        if litellm:
            litellm.wait()
            print(f"bench-gateway: LiteLLM up on {litellm.base}", flush=True)
        script = gh.write_wrk_script(root)
        targets = [("nginx direct (floor)", f"{nginx.json_base_url}/chat/completions", "miss", "none", MODEL)]
        if litellm:
            targets.append(("LiteLLM proxy", f"{litellm.base}/v1/chat/completions", "miss", litellm.master_key,
                            MODEL))
        if tg.edge_port:
            first = tg.chat(f"hit check {run_id}")
            time.sleep(0.5)
            hit_prompt = f"What does a gateway do? {run_id}"  # the Lua script's fixed prompt
            tg.chat(hit_prompt)
            time.sleep(0.5)
            again = tg.chat(hit_prompt)
            extra = again.get("tollgate")
            tier = str(extra.get("cache_tier", "?")) if isinstance(extra, dict) else "?"
            sent_to_router += 3
            if "exact" not in tier.lower():
                raise gh.HarnessError(f"the warmed prompt was not an exact hit at the edge (cache_tier {tier!r})")
            print(f"bench-gateway: edge answers ({first['choices'][0]['message']['content']!r}), "  # type: ignore[index]
                  f"warmed prompt is an exact hit", flush=True)
            targets += [("tollgate edge, cache miss", f"{tg.edge_base}/v1/chat/completions", "miss", tg.key, MODEL),
                        ("tollgate edge, exact hit", f"{tg.edge_base}/v1/chat/completions", "hit", tg.key, MODEL)]
        http, commands, edge_requests = http_rows(targets, script, connections, args.duration, args.warmup, run_id)
        sent_to_router += edge_requests
        if not args.skip_grpc:
            print("bench-gateway: gRPC path …", flush=True)
            grpc_, calls = asyncio.run(grpc_rows(tg, connections, args.grpc_requests))
            sent_to_router += calls
        ledger = asyncio.run(tg.ledger_rows())
        finished = True
    finally:
        tg.stop()
        if litellm:
            litellm.stop()
        nginx.stop()
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"bench-gateway: failed; logs kept under {root}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    cmd = "make bench-gateway  # python -m tests.bench.bench_gateway " + " ".join(
        [f"--duration {args.duration:g}", f"--connections {args.connections}", f"--warmup {args.warmup:g}",
         f"--grpc-requests {args.grpc_requests}"] + (["--skip-litellm"] if args.skip_litellm else []))
    ratio, verdicts = _targets(http, connections)
    section = [
        "## Gateway over HTTP: tollgate's edge vs. the LiteLLM proxy (wrk, same upstream)",
        "",
        f"Command: `{cmd} --write`. Machine: {platform.machine()}, {os.cpu_count()} cores, {_meminfo_gib()}, "
        f"Python {platform.python_version()}; load average {load_before[0]:.2f} before the run, "
        f"{load_after[0]:.2f} after (other work may share the cores). "
        f"Versions: LiteLLM {versions['LiteLLM']}, nginx {versions['nginx']}, wrk {versions['wrk']}.",
        "",
        "Setup, all on loopback: nginx (1 worker, no access log) returns a fixed chat completion — JSON for "
        "LiteLLM, the SSE stream tollgate's OpenAI-style engine always requests; same text, same usage. "
        "LiteLLM proxy: 2 workers, no database, no cache, a master key (checked per request). "
        f"tollgate: the whole mesh as `tollgate up` starts it, private Redis and PostgreSQL, edge {tg.edge_note}; "
        "a member key with RPM/TPM/TPD limits and daily/monthly budgets at key, team and org "
        "(every request reserves and commits), exact cache on (misses are stored), usage to the ledger. "
        f"wrk: `-t min(c,2) -c c -d {args.duration:g}s --timeout=10s` with the Lua script in "
        "`tests/bench/gateway_harness.py` (POST, `Authorization: Bearer`, "
        "`{\"model\":\"bench-model\",\"messages\":[…],\"max_tokens\":16,\"temperature\":0}`; "
        "a unique prompt per request on miss runs, one warmed prompt on hit runs), a "
        f"{args.warmup:g} s unrecorded warm-up before each run; targets run one after another, interleaved per "
        "connection count. Errors are any non-2xx status, socket error or timeout; req/s counts 2xx only.",
        "",
        "Example commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        "### HTTP, wrk",
        "",
        *_table(http),
        "",
        "### Ratios tollgate / LiteLLM (below 1 is better for tollgate's latency; above 1 for throughput)",
        "",
        *(ratio if len(ratio) > 2 else ["LiteLLM not measured in this run."]),
        "",
        "### Targets (issue 9)",
        "",
        *verdicts,
    ]
    if grpc_:
        section += ["", "### gRPC path (grpc.aio closed-loop client, same mesh, same key)", "",
                    f"{args.grpc_requests} calls per row after 20 warm-up calls; the client runs in the benchmark "
                    "process on the same cores. Misses are stored in the cache, as on the HTTP path.", "",
                    *_grpc_table(grpc_)]
    if ledger is not None:
        n, paid, tiers = ledger
        by_tier = ", ".join(f"{tier} {count:,}" for tier, count in tiers.items())
        semantic = sum(v for k, v in tiers.items() if "semantic" in k.lower())
        section += ["", f"Ledger check: {n:,} usage rows for the bench key ({paid:,} with a cost; by cache tier and "
                    f"status: {by_tier}) for {sent_to_router:,} requests counted as answered through the router (wrk "
                    "closes its connections when a run ends: requests in flight then are not counted by wrk and are "
                    "settled as cancelled). "
                    + ("No miss-path prompt was answered by the semantic tier." if semantic == 0 else
                       f"**{semantic:,} miss-path requests were answered by the semantic tier**: those miss rows "
                       "are partly hits.")]
    text = "\n".join(section)
    print("\n" + text)
    if args.write:
        write_section(MARK, text)
        print(f"\nbench-gateway: wrote the {MARK} section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
