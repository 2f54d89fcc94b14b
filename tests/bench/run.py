"""``make bench``: gateway overhead over gRPC, side by side with its baseline, in one run.

Starts a private mesh (fake provider upstream, private Redis/PostgreSQL unless
TOLLGATE_REDIS_URL/TOLLGATE_DATABASE_URL are set), then at each concurrency measures:
- baseline: InferenceService.Generate called directly (same upstream, no gateway work);
- router miss: RouterService.Generate with auth, reservation, inference, commit, usage event;
- router exact hit: auth, cache lookup, usage event.
Writes a markdown table to stdout and, with --write, into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import uuid
from pathlib import Path

import grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from ops.cli import start_mesh
from ops.launcher import LauncherSettings, free_port
from tests.bench.load import measure

MODEL = "bench-small"
DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
MARK = "bench:gateway-grpc"


def _messages(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=text)]


async def _bench(router: str, inference: str, admin_key: str, concurrencies: list[int], total: int) -> list[str]:
    async with grpc.aio.insecure_channel(router) as rch, grpc.aio.insecure_channel(inference) as ich:
        admin = admin_pb2_grpc.AdminServiceStub(rch)
        md = (("authorization", f"Bearer {admin_key}"),)
        p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
        key = (await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=p.org_id, team_id=p.team_id, name="bench", role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)).key
        key_md = (("authorization", f"Bearer {key}"),)
        router_stub = router_pb2_grpc.RouterServiceStub(rch)
        inference_stub = inference_pb2_grpc.InferenceServiceStub(ich)
        params = common_pb2.GenerationParams(temperature=0.0, max_output_tokens=16)
        run_id = uuid.uuid4().hex[:8]

        async def direct(i: int) -> None:
            async for _ in inference_stub.Generate(inference_pb2.GenerateRequest(
                    request_id=f"b{run_id}{i}", model=MODEL, messages=_messages(f"q {i}"), params=params),
                    timeout=10):
                pass

        async def miss(i: int) -> None:
            await router_stub.Generate(router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
                model=MODEL, messages=_messages(f"q {run_id} {i}"), params=params,
                cache_control=router_pb2.CacheControl(no_store=True))), metadata=key_md, timeout=10)

        hit_input = router_pb2.GenerationInput(model=MODEL, messages=_messages(f"hit {run_id}"), params=params)
        await router_stub.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md, timeout=10)
        await asyncio.sleep(0.5)

        async def hit(i: int) -> None:
            resp = await router_stub.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=key_md,
                                              timeout=10)
            assert resp.summary.cache_tier == common_pb2.CACHE_TIER_EXACT

        rows = ["| concurrency | path | p50 ms | p99 ms | req/s | p50 overhead vs direct |",
                "|---:|---|---:|---:|---:|---:|"]
        for c in concurrencies:
            base = await measure(direct, c, total, warmup=min(20, total))
            for name, fn in (("direct inference (baseline)", None), ("router, cache miss", miss),
                             ("router, exact hit", hit)):
                r = base if fn is None else await measure(fn, c, total, warmup=min(20, total))
                overhead = "" if fn is None else f"{r['p50_ms'] - base['p50_ms']:+.2f} ms"
                rows.append(f"| {c} | {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['per_s']:.0f} | {overhead} |")
    return rows


def write_section(mark: str, section: str) -> None:
    """Replace (or append) the block between ``<!-- {mark}:begin/end -->`` markers in docs/benchmarks.md."""
    begin, end = f"<!-- {mark}:begin -->", f"<!-- {mark}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp:
        settings = LauncherSettings(data_dir=Path(tmp), fake_provider_port=free_port()).model_copy(update={
            **{f"{n}_port": free_port() for n in ("router", "cache", "ratelimit", "retrieval", "inference", "edge")},
            "inference_engine": "openai", "inference_models": MODEL, "provider_base_url": ""})
        import os

        os.environ["TOLLGATE_LOG_LEVEL"] = "WARNING"
        mesh, admin_key = start_mesh(settings)
        try:
            assert admin_key
            rows = asyncio.run(_bench(mesh.router_address, f"127.0.0.1:{settings.inference_port}", admin_key,
                                      [int(c) for c in args.concurrency.split(",")], args.requests))
        finally:
            mesh.stop()
    cmd = f"make bench  # python -m tests.bench.run --requests {args.requests} --concurrency {args.concurrency}"
    section = "\n".join([
        "## Gateway overhead over gRPC (router vs. calling inference directly)",
        "",
        f"Command: `{cmd} --write`. Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}. Upstream: the bundled fake provider (answers in well under a millisecond), "
        "so the numbers are the mesh's own cost. All three paths are measured in the same run, one after another.",
        "",
        *rows,
    ])
    print(section)
    if args.write:
        write_section(MARK, section)
    sys.exit(0)


if __name__ == "__main__":

    main()
