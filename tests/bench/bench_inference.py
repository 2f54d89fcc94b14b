"""Inference benchmark: the vLLM engine driven directly vs. through the inference service (gRPC), one run.

Both paths use the same engine settings and the same prompts (MT-Bench first turns
from ../shared/data, else built-in ones). Both engines are up for the whole run, and
at each concurrency ``c`` the two paths take turns block by block in alternating order
(direct first, then gRPC first, ...), so a slow minute of the machine falls on both
alike. A block is a closed loop: ``c`` streams in flight at all times (as vLLM's own
serving benchmark does with ``--max-concurrency``) until the block's prompts are done;
each path's blocks get the same prompts. Reports aggregate output tokens/s (all tokens
over all blocks' wall time), time to first token (TTFT) p50/p99 over every stream, and
the added TTFT as the median of per-prompt differences (gRPC minus direct, same prompt),
which is not blurred by prompt length the way a difference of two medians is.

CPU (this machine, the bundled SmolLM2-135M):
    python -m tests.bench.bench_inference --write
GPU node (`pip install 'tollgate[inference,vllm-gpu]'`, a real model folder):
    python -m tests.bench.bench_inference --device cuda --model /models/Qwen2.5-7B-Instruct \\
        --max-num-seqs 256 --concurrency 1,8,32,128 --max-tokens 256 --gpu-memory-utilization 0.45
(two engines share the GPU during the run, so give each at most half of its memory).
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tollgate.common.v1 import common_pb2
from tollgate.inference.v1 import inference_pb2, inference_pb2_grpc

from libs.chat import ChatMessage, GenerationChunk, GenerationParams, Role
from libs.deadlines import Deadline
from services.inference.model_setup import DEFAULT_DIR, MODEL_NAME
from tests.bench.load import measure
from tests.support.infra import free_port
from tests.support.procs import ServiceProcess

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mt_bench" / "question.jsonl"
DOC = Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md"
MARK = "bench:inference"
# A finished engine's core keeps polling its worker for about a second (vLLM's shm queue busy-loop);
# the pause lets it go idle before the other path's block starts.
SETTLE_S = 1.5

Run = Callable[[str, str], AsyncIterator[int]]  # (request id, prompt) -> the token count of each delta


def prompt_texts() -> list[str]:
    texts: list[str] = []
    if DATA.exists():
        texts = [json.loads(line)["turns"][0] for line in DATA.read_text().splitlines() if line.strip()]
    return texts or [f"Explain topic number {i} in a few sentences." for i in range(80)]


@dataclass
class PathStats:
    """One path at one concurrency, over all its blocks; TTFTs keyed by prompt (for pairing)."""

    ttft_ms: dict[int, float] = field(default_factory=dict)
    tokens: int = 0
    wall_s: float = 0.0
    # gRPC path only: CPU of the service process itself, and of the vLLM processes under it (engine core, worker).
    service_cpu_ms: float = 0.0
    engine_cpu_ms: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float:
        xs = sorted(self.ttft_ms.values())
        if q == 0.5:
            return statistics.median(xs)
        return xs[min(len(xs) - 1, int(len(xs) * q))]


def paired_added_ttft(direct: PathStats, grpc: PathStats) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile of gRPC minus direct TTFT over the prompts both paths served."""
    diffs = sorted(grpc.ttft_ms[k] - direct.ttft_ms[k] for k in direct.ttft_ms.keys() & grpc.ttft_ms.keys())
    return statistics.median(diffs), diffs[len(diffs) // 4], diffs[(3 * len(diffs)) // 4]


async def run_block(run: Run, prompts: list[tuple[int, str]], concurrency: int, tag: str, into: PathStats) -> None:
    """A closed loop (the benchmarks' shared load generator): ``concurrency`` streams in flight until every
    prompt is served."""

    async def stream(i: int) -> None:
        key, text = prompts[i]
        t0 = time.perf_counter()
        first = True
        async for n in run(f"{tag}-{key}", text):
            if first and n:
                into.ttft_ms[key] = (time.perf_counter() - t0) * 1000
                first = False
            into.tokens += n

    result = await measure(stream, concurrency, len(prompts), warmup=0)
    into.wall_s += len(prompts) / result["per_s"]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """User + system CPU of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *descendants(int(child))]
    return out


def cpu_split_ms(pid: int) -> tuple[float, float]:
    """CPU of ``pid`` itself and of everything under it."""
    return cpu_ms(pid), sum(cpu_ms(child) for child in descendants(pid))


def params(max_tokens: int) -> GenerationParams:
    return GenerationParams(temperature=0.0, max_output_tokens=max_tokens)


def start_direct(args: argparse.Namespace) -> tuple[Run, Callable[[], Awaitable[None]]]:
    from services.inference.vllm_engine import VllmEngine, VllmOptions

    engine = VllmEngine.start(VllmOptions(
        model_path=Path(args.model), served_name=MODEL_NAME, device=args.device, max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len, cpu_kv_cache_bytes=args.kv_mib << 20,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.device == "cpu"))

    async def run(request_id: str, text: str) -> AsyncIterator[int]:
        chunk: GenerationChunk
        async for chunk in engine.generate(request_id, MODEL_NAME, [ChatMessage(Role.USER, text)],
                                           params(args.max_tokens), Deadline.after(600)):
            yield chunk.output_tokens

    return run, engine.aclose


def service_env(args: argparse.Namespace, port: int) -> dict[str, str]:
    # The same engine arguments as start_direct, through the service's settings.
    return {"TOLLGATE_INFERENCE_PORT": str(port), "TOLLGATE_INFERENCE_ENGINE": "vllm",
            "TOLLGATE_INFERENCE_MODELS": MODEL_NAME, "TOLLGATE_INFERENCE_VLLM_MODEL_PATH": str(args.model),
            "TOLLGATE_INFERENCE_VLLM_DEVICE": args.device,
            "TOLLGATE_INFERENCE_VLLM_MAX_NUM_SEQS": str(args.max_num_seqs),
            "TOLLGATE_INFERENCE_VLLM_MAX_MODEL_LEN": str(args.max_model_len),
            "TOLLGATE_INFERENCE_VLLM_CPU_KV_CACHE_MIB": str(args.kv_mib),
            "TOLLGATE_INFERENCE_VLLM_GPU_MEMORY_UTILIZATION": str(args.gpu_memory_utilization),
            "TOLLGATE_INFERENCE_VLLM_ENFORCE_EAGER": "true" if args.device == "cpu" else "false",
            "TOLLGATE_INFERENCE_MAX_WAITING": "1024", "TOLLGATE_LOG_LEVEL": "WARNING"}


def grpc_run(stub: inference_pb2_grpc.InferenceServiceStub, max_tokens: int) -> Run:
    async def run(request_id: str, text: str) -> AsyncIterator[int]:
        req = inference_pb2.GenerateRequest(
            request_id=request_id, model=MODEL_NAME,
            messages=[common_pb2.ChatMessage(role=common_pb2.MESSAGE_ROLE_USER, content=text)],
            params=common_pb2.GenerationParams(temperature=0.0, max_output_tokens=max_tokens))
        async for resp in stub.Generate(req, timeout=600):
            yield resp.delta_output_tokens

    return run


def block_size(args: argparse.Namespace, c: int) -> int:
    # At least --min-streams streams per block, and at least three waves of c, so the closed loop is not
    # just one synchronised burst.
    return max(args.min_streams, 3 * c)


async def compare(args: argparse.Namespace) -> dict[int, dict[str, PathStats]]:
    texts = prompt_texts()
    direct_run, direct_close = start_direct(args)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = ServiceProcess("inference", port, service_env(args, port), Path(tmp))
        try:
            await asyncio.to_thread(proc.wait_ready, 900)
            async with grpc.aio.insecure_channel(proc.address) as channel:
                runs = {"direct": direct_run, "grpc": grpc_run(inference_pb2_grpc.InferenceServiceStub(channel),
                                                                args.max_tokens)}
                for name, run in runs.items():  # warm-up, unrecorded
                    await run_block(run, list(enumerate(texts[-4:])), 2, f"warm-{name}", PathStats())
                out: dict[int, dict[str, PathStats]] = {}
                key = 0
                for c in args.levels:
                    out[c] = {"direct": PathStats(), "grpc": PathStats()}
                    for b in range(args.blocks):
                        n = block_size(args, c)
                        prompts = [(key + i, texts[(key + i) % len(texts)]) for i in range(n)]
                        key += n
                        for name in (("direct", "grpc") if b % 2 == 0 else ("grpc", "direct")):
                            await asyncio.sleep(SETTLE_S)
                            before = cpu_split_ms(proc.proc.pid)
                            await run_block(runs[name], prompts, c, f"{name}-c{c}", out[c][name])
                            if name == "grpc":
                                after = cpu_split_ms(proc.proc.pid)
                                out[c][name].service_cpu_ms += after[0] - before[0]
                                out[c][name].engine_cpu_ms += after[1] - before[1]
                    d, g = out[c]["direct"], out[c]["grpc"]
                    print(f"c={c}: direct {d.tok_s:.1f} tok/s TTFT p50 {d.ttft(0.5):.1f} ms | gRPC {g.tok_s:.1f} "
                          f"tok/s TTFT p50 {g.ttft(0.5):.1f} ms | paired added TTFT {paired_added_ttft(d, g)[0]:+.1f} "
                          f"ms ({len(d.ttft_ms)} streams each)", file=sys.stderr)
                return out
        finally:
            proc.stop(60)
            await direct_close()


def render(args: argparse.Namespace, results: dict[int, dict[str, PathStats]], load_before: float) -> str:
    rows = ["| concurrency | streams per path | direct tok/s | gRPC tok/s | throughput ratio | direct TTFT p50 ms "
            "| gRPC TTFT p50 ms | difference of p50s ms | added TTFT, paired median (IQR) ms | direct TTFT p99 ms "
            "| gRPC TTFT p99 ms |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for c in args.levels:
        d, g = results[c]["direct"], results[c]["grpc"]
        ratio = g.tok_s / d.tok_s
        added, q1, q3 = paired_added_ttft(d, g)
        rows.append(f"| {c} | {len(d.ttft_ms)} | {d.tok_s:.1f} | {g.tok_s:.1f} | {ratio:.3f} | {d.ttft(0.5):.1f} | "
                    f"{g.ttft(0.5):.1f} | {g.ttft(0.5) - d.ttft(0.5):+.1f} | {added:+.1f} ({q1:+.1f} to {q3:+.1f}) | "
                    f"{d.ttft(0.99):.1f} | "
                    f"{g.ttft(0.99):.1f} |")
        verdicts.append(f"c={c}: throughput {ratio:.1%} of direct ({'met' if ratio >= 0.95 else 'NOT met'}), "
                        f"added TTFT {added:+.1f} ms ({'met' if added <= 5.0 else 'NOT met'})")
    cmd = (f"python -m tests.bench.bench_inference --device {args.device} --concurrency {args.concurrency} "
           f"--max-tokens {args.max_tokens} --max-num-seqs {args.max_num_seqs} --blocks {args.blocks} "
           f"--min-streams {args.min_streams} --write")
    return "\n".join([
        f"## Inference: vLLM through the inference service (gRPC) vs. the engine driven directly ({args.device})",
        "", f"Command: `{cmd}`. Model: {Path(args.model).name}; {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load_before:.2f} before the run. Same engine settings (max_num_seqs {args.max_num_seqs}, "
        f"{'eager' if args.device == 'cpu' else 'CUDA graphs'}, bf16) and prompts (MT-Bench first turns, "
        f"temperature 0, up to {args.max_tokens} tokens) on both paths. Both engines run for the whole benchmark "
        "(the service as its own process, the direct engine in the benchmark's); at each concurrency the paths "
        "alternate block by block, each block a closed loop with `c` streams in flight over the same prompts for "
        "both paths. tok/s: all output tokens over all blocks' wall time. Added TTFT: median over prompts of "
        "(gRPC TTFT - direct TTFT) for the same prompt (the verdict below uses it; the difference of the two p50s "
        "is shown too). Target: gRPC throughput >= 95% of direct, TTFT <= +5 ms.",
        "", *rows, "",
        "CPU per generated token on the gRPC path (from /proc, over the gRPC blocks): the service process "
        + ", ".join(f"{g.service_cpu_ms / max(1, g.tokens):.2f} ms at c={c}"
                    for c, g in ((c, results[c]["grpc"]) for c in args.levels))
        + "; vLLM's engine core and worker under it "
        + ", ".join(f"{g.engine_cpu_ms / max(1, g.tokens):.2f} ms"
                    for g in (results[c]["grpc"] for c in args.levels)) + ".",
        "", "Result: " + "; ".join(verdicts) + "."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_DIR))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-mib", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    parser.add_argument("--blocks", type=int, default=4, help="blocks per path and concurrency")
    parser.add_argument("--min-streams", type=int, default=8, help="at least this many streams per block")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()[0]
    results = asyncio.run(compare(args))
    section = render(args, results, load_before)
    print(section)
    if args.write:
        from tests.bench.run import write_section

        write_section(MARK, section)
    sys.exit(0)


if __name__ == "__main__":
    main()
