"""Inference benchmark: the vLLM engine driven directly vs. through the inference service (gRPC), one run.

Both paths use the same engine settings and the same prompts (MT-Bench first turns
from ../shared/data, else built-in ones), at each concurrency. Reports aggregate
output tokens/s and time to first token (TTFT) p50/p99, and the gRPC/direct ratios.

CPU (this machine, the bundled SmolLM2-135M):
    python -m tests.bench.bench_inference --write
GPU node (`pip install 'tollgate[inference,vllm-gpu]'`, a real model folder):
    python -m tests.bench.bench_inference --device cuda --model /models/Qwen2.5-7B-Instruct \\
        --max-num-seqs 256 --concurrency 1,8,32,128 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.chat import ChatMessage, GenerationChunk, GenerationParams, Role
from libs.deadlines import Deadline
from services.inference.model_setup import DEFAULT_DIR, MODEL_NAME
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mt_bench" / "question.jsonl"
DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
MARK = "bench:inference"


def prompts(n: int) -> list[str]:
    texts: list[str] = []
    if DATA.exists():
        for line in DATA.read_text().splitlines():
            texts.append(json.loads(line)["turns"][0])
    if not texts:
        texts = [f"Explain topic number {i} in a few sentences." for i in range(n)]
    return [texts[i % len(texts)] for i in range(n)]


Run = Callable[[int, str], AsyncIterator[int]]  # yields the token count of each delta


async def measure(run: Run, concurrency: int, rounds: int) -> dict[str, float]:
    texts = prompts(concurrency * rounds)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first = True
        async for n in run(i, texts[i]):
            if first and n:
                ttfts.append((time.perf_counter() - t0) * 1000)
                first = False
            tokens += n

    start = time.perf_counter()
    for r in range(rounds):
        await asyncio.gather(*(one(r * concurrency + k) for k in range(concurrency)))
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))], "tokens": tokens}


def params(max_tokens: int) -> GenerationParams:
    return GenerationParams(temperature=0.0, max_output_tokens=max_tokens)


async def direct(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    from services.inference.vllm_engine import VllmEngine, VllmOptions

    engine = VllmEngine.start(VllmOptions(
        model_path=Path(args.model), served_name=MODEL_NAME, device=args.device, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, cpu_kv_cache_bytes=args.kv_mib << 20))

    async def run(i: int, text: str) -> AsyncIterator[int]:
        chunk: GenerationChunk
        async for chunk in engine.generate(f"d{i}", MODEL_NAME, [ChatMessage(Role.USER, text)],
                                           params(args.max_tokens), Deadline.after(600)):
            yield chunk.output_tokens

    try:
        await measure(run, 2, 1)  # warm-up
        return {c: await measure(run, c, args.rounds if c < 32 else 1) for c in args.levels}
    finally:
        await engine.aclose()


async def through_service(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    port = free_port()
    env = {"TOLLGATE_INFERENCE_PORT": str(port), "TOLLGATE_INFERENCE_ENGINE": "vllm",
           "TOLLGATE_INFERENCE_MODELS": MODEL_NAME, "TOLLGATE_INFERENCE_VLLM_MODEL_PATH": str(args.model),
           "TOLLGATE_INFERENCE_VLLM_DEVICE": args.device,
           "TOLLGATE_INFERENCE_VLLM_MAX_NUM_SEQS": str(args.max_num_seqs),
           "TOLLGATE_INFERENCE_VLLM_MAX_MODEL_LEN": str(args.max_model_len),
           "TOLLGATE_INFERENCE_VLLM_CPU_KV_CACHE_MIB": str(args.kv_mib),
           "TOLLGATE_INFERENCE_MAX_WAITING": "1024", "TOLLGATE_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp:
        proc = ServiceProcess("inference", port, env, Path(tmp))
        try:
            await asyncio.to_thread(proc.wait_ready, 600)
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)

                async def run(i: int, text: str) -> AsyncIterator[int]:
                    req = inference_pb2.GenerateRequest(
                        request_id=f"g{i}", model=MODEL_NAME,
                        messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=text)],
                        params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=args.max_tokens))
                    async for resp in stub.Generate(req, timeout=600):
                        yield resp.delta_output_tokens

                await measure(run, 2, 1)
                return {c: await measure(run, c, args.rounds if c < 32 else 1) for c in args.levels}
        finally:
            proc.stop(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_DIR))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    base = asyncio.run(direct(args))
    svc = asyncio.run(through_service(args))
    rows = ["| concurrency | direct tok/s | gRPC tok/s | throughput ratio | direct TTFT p50 ms | gRPC TTFT p50 ms "
            "| added TTFT p50 ms | direct TTFT p99 ms | gRPC TTFT p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in args.levels:
        d, g = base[c], svc[c]
        rows.append(f"| {c} | {d['tok_s']:.1f} | {g['tok_s']:.1f} | {g['tok_s'] / d['tok_s']:.3f} | "
                    f"{d['ttft_p50']:.1f} | {g['ttft_p50']:.1f} | {g['ttft_p50'] - d['ttft_p50']:+.1f} | "
                    f"{d['ttft_p99']:.1f} | {g['ttft_p99']:.1f} |")
    cmd = (f"python -m tests.bench.bench_inference --device {args.device} --concurrency {args.concurrency} "
           f"--max-tokens {args.max_tokens} --max-num-seqs {args.max_num_seqs} --rounds {args.rounds} --write")
    section = "\n".join([
        f"## Inference: vLLM through the inference service (gRPC) vs. the engine driven directly ({args.device})",
        "", f"Command: `{cmd}`. Model: {Path(args.model).name}; {platform.machine()}, {os.cpu_count()} cores. "
        f"Same engine settings (max_num_seqs {args.max_num_seqs}, eager, bf16) and prompts (MT-Bench first turns, "
        f"temperature 0, up to {args.max_tokens} tokens) on both paths, one after the other in one run; the "
        "gRPC path runs the service as its own process. Target: gRPC throughput >= 95% of direct, TTFT <= +5 ms.",
        "", *rows])
    print(section)
    if args.write:
        from tests.bench.run import write_section

        write_section(MARK, section)
    sys.exit(0)


if __name__ == "__main__":
    main()
