"""Where the gateway's CPU goes: CPU milliseconds per request in each process of the mesh.

``python -m tests.bench.cpu_per_request [--requests 300] [--profile miss|hit --seconds 12]``

Starts a private mesh (fake provider upstream), then for each path (direct InferenceService call, router miss,
router exact hit) runs requests one at a time and reads every child's user+system CPU from /proc before and
after. With ``--profile`` it also records each service with py-spy (``pip install py-spy``) while that path
runs, writing collapsed stacks to ``<out>/<path>-<service>.txt``. Linux only. Used for the hot-path notes in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc
from tollgate.router.v1 import admin_pb2, admin_pb2_grpc, router_pb2, router_pb2_grpc

from ops.cli import start_mesh
from ops.launcher import LauncherSettings, Mesh, free_port
from tests.bench.load import measure
from tests.bench.run import _messages

MODEL = "bench-small"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ms(mesh: Mesh) -> dict[str, float]:
    out = {}
    for child in mesh.children:
        fields = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[child.name] = (int(fields[11]) + int(fields[12])) * 1000 / CLOCK_TICKS
    return out


async def _run(mesh: Mesh, inference: str, admin_key: str, total: int, profile: str, seconds: float,
               out: Path) -> None:
    async with grpc.aio.insecure_channel(mesh.router_address) as rch, grpc.aio.insecure_channel(inference) as ich:
        admin = admin_pb2_grpc.AdminServiceStub(rch)
        md = (("authorization", f"Bearer {admin_key}"),)
        p = (await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=md)).keys[0].principal
        key = (await admin.CreateKey(admin_pb2.CreateKeyRequest(
            org_id=p.org_id, team_id=p.team_id, name="cpu", role=admin_pb2.KEY_ROLE_MEMBER), metadata=md)).key
        kmd = (("authorization", f"Bearer {key}"),)
        router, direct_stub = router_pb2_grpc.RouterServiceStub(rch), inference_pb2_grpc.InferenceServiceStub(ich)
        from tollgate.common.v1 import common_pb2

        params = common_pb2.GenerationParams(temperature=0.0, max_output_tokens=16)
        run = uuid.uuid4().hex[:6]

        async def direct(i: int) -> None:
            async for _ in direct_stub.Generate(inference_pb2.GenerateRequest(
                    request_id=f"d{run}{i}", model=MODEL, messages=_messages(f"q {i}"), params=params), timeout=10):
                pass

        async def miss(i: int) -> None:
            await router.Generate(router_pb2.GenerateRequest(input=router_pb2.GenerationInput(
                model=MODEL, messages=_messages(f"q {run} {i}"), params=params,
                cache_control=router_pb2.CacheControl(no_store=True))), metadata=kmd, timeout=10)

        hit_input = router_pb2.GenerationInput(model=MODEL, messages=_messages(f"hit {run}"), params=params)
        await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=kmd, timeout=10)
        await asyncio.sleep(0.5)

        async def hit(i: int) -> None:
            await router.Generate(router_pb2.GenerateRequest(input=hit_input), metadata=kmd, timeout=10)

        paths: dict[str, Callable[[int], Awaitable[None]]] = {"direct": direct, "miss": miss, "hit": hit}
        print("| path | p50 ms | CPU ms per request, by process |\n|---|---:|---|")
        for name, fn in paths.items():
            await measure(fn, 1, 30, warmup=5)
            before = _cpu_ms(mesh)
            result = await measure(fn, 1, total, warmup=0)
            after = _cpu_ms(mesh)
            per = {k: (after[k] - before[k]) / total for k in after if after[k] - before[k] > 0}
            shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
            print(f"| {name} | {result['p50_ms']:.2f} | {shown} (total {sum(per.values()):.1f}) |", flush=True)
        if profile:
            spy = shutil.which("py-spy")
            if spy is None:
                raise SystemExit("--profile needs py-spy (pip install py-spy)")
            pids = {c.name: c.proc.pid for c in mesh.children}
            recorders = [await asyncio.create_subprocess_exec(
                spy, "record", "-p", str(pids[n]), "-d", str(int(seconds)), "-r", "200", "-f", "raw",
                "-o", str(out / f"{profile}-{n}.txt"), "--nonblocking",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for n in ("router", "cache", "ratelimit", "inference", "edge") if n in pids]
            t0, i = time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                await paths[profile](10**6 + i)
                i += 1
            for r in recorders:
                await r.wait()
            print(f"py-spy: {i} {profile} requests profiled; collapsed stacks in {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--profile", choices=["", "direct", "miss", "hit"], default="")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tollgate-profile")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["TOLLGATE_LOG_LEVEL"] = "WARNING"
    with tempfile.TemporaryDirectory(prefix="tollgate-cpu-") as tmp:
        settings = LauncherSettings(data_dir=Path(tmp), fake_provider_port=free_port()).model_copy(update={
            **{f"{n}_port": free_port() for n in ("router", "cache", "ratelimit", "retrieval", "inference", "edge")},
            "inference_engine": "openai", "inference_models": MODEL, "provider_base_url": ""})
        mesh, admin_key = start_mesh(settings)
        try:
            assert admin_key
            asyncio.run(_run(mesh, f"127.0.0.1:{settings.inference_port}", admin_key, args.requests, args.profile,
                             args.seconds, args.out))
        finally:
            mesh.stop()


if __name__ == "__main__":
    main()
