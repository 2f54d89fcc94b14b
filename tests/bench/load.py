"""The closed-loop load generator the benchmarks share: ``concurrency`` workers take request numbers
until ``total`` are done; latency percentiles and throughput over the measured calls."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable


async def measure(call: Callable[[int], Awaitable[object]], concurrency: int, total: int,
                  warmup: int = 20) -> dict[str, float]:
    """``call(i)`` for i in 0..total-1 after ``warmup`` unmeasured calls (numbered -1, -2, ...)."""
    for i in range(warmup):
        await call(-i - 1)
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
            "per_s": len(latencies) / wall}
