"""The cache's memory under a store-heavy soak, in simulated time (issue 24).

    .venv/bin/python -m tests.bench.soak_cache_memory [--stores 40000] [--rate 26] [--ttl 120] [--stale 60]
        [--sweep 30] [--max-entries N] [--tracemalloc]

Drives the cache as the service runs it (``ResponseCache`` over the exact tier in Redis and the semantic
tier on qdrant-edge in a folder of its own, the periodic sweep of ``server._sweep_forever``) with a
lookup and a store of a unique prompt per step, ``--rate`` stores per simulated second (the 8-minute
soak stored ~26/s), a sweep every ``--sweep`` simulated seconds. The cache's clock is simulated, so
tens of thousands of stores take a few minutes, not hours; the expiries and sweeps happen as they
would at that rate. Every ``--sample`` stores it prints RSS (anonymous and file-backed apart), the
vector store's live points and segments, the shard's size on disk (WAL and segments apart) and, with
``--tracemalloc``, the Python heap. Needs Redis at TOLLGATE_REDIS_URL (default 127.0.0.1:6379); its
keys are under a prefix of their own, removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import psutil
from redis.asyncio import Redis

from libs.chat import TokenUsage
from services.cache.cache import ResponseCache
from services.cache.embedding import StaticEmbedder
from services.cache.exact import ExactTier, RedisExactStore
from services.cache.semantic import SemanticTier
from services.cache.setup_models import ensure_static_model
from services.cache.vectors import DEFAULT_MAX_ENTRIES, EdgeVectorStore
from services.cache.verifier import Verifier
from tests.unit.cache.cache_test_support import chat_key

WORDS = (
    "account", "balance", "card", "transfer", "refund", "payment", "limit", "exchange", "rate", "fee",
    "pending", "declined", "top", "up", "cash", "withdrawal", "atm", "pin", "verify", "identity", "phone",
    "lost", "stolen", "freeze", "unlock", "savings", "interest", "loan", "mortgage", "travel", "abroad",
    "currency", "salary", "direct", "debit", "cheque", "statement", "overdraft", "charge", "dispute",
    "merchant", "online", "shopping", "contactless", "apple", "google", "pay", "virtual", "physical",
    "delivery", "address", "change",
)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc() -> tuple[float, float]:
    """glibc's heap: bytes in use and free-but-kept (MiB), over all arenas."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        mi = libc.mallinfo2()
        return (mi.uordblks + mi.hblkhd) / 2**20, mi.fordblks / 2**20
    except (OSError, AttributeError):
        return 0.0, 0.0


def prompt(rng: random.Random, i: int) -> str:
    return f"{' '.join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))} (case {i})?"


async def run(args: argparse.Namespace) -> int:
    if args.tracemalloc:
        tracemalloc.start()
    rng = random.Random(11)
    proc = psutil.Process()
    root = Path(tempfile.mkdtemp(prefix="tollgate-soak-"))
    path = root / "cache-vectors"
    sim = [1_800_000_000.0]
    embedder = StaticEmbedder(ensure_static_model())
    vectors = EdgeVectorStore(path, embedder.dim, max_entries=args.max_entries)
    semantic = SemanticTier(vectors, embedder, Verifier.load(), stale_window_s=args.stale)
    client = Redis.from_url(os.environ.get("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    prefix = f"tg-soak-{uuid.uuid4().hex[:8]}:"
    store = RedisExactStore(client, prefix)
    cache = ResponseCache([ExactTier(store, stale_window_s=args.stale), semantic], stats=store,
                          default_ttl_s=args.ttl, max_ttl_s=max(args.ttl, 1), max_entry_bytes=256 * 1024,
                          clock=lambda: sim[0])
    answer = "A cached answer of a realistic length, a few sentences long. " * 8
    print(f"# {args.stores} stores, {args.rate}/s simulated, ttl {args.ttl}s + stale {args.stale}s, sweep every "
          f"{args.sweep}s, at most {args.max_entries} entries; shard in {path}")
    print("| stores | sim min | RSS MiB | anon MiB | file MiB | malloc used / free MiB | py heap MiB "
          "| points | segments | wal MiB | segments MiB | swept |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    next_sweep = sim[0] + args.sweep
    start, swept, wall0 = sim[0], 0, time.perf_counter()

    async def sample(i: int) -> None:
        used, free = _malloc()
        heap = tracemalloc.get_traced_memory()[0] / 2**20 if args.tracemalloc else 0.0
        info = vectors._store.shard.info()
        wal = _du(path / "wal")
        print(f"| {i} | {(sim[0] - start) / 60:.1f} | {proc.memory_info().rss / 2**20:.0f} "
              f"| {_status_kb('RssAnon') / 1024:.0f} | {_status_kb('RssFile') / 1024:.0f} | {used:.0f} / {free:.0f} "
              f"| {heap:.1f} | {await vectors.count()} | {info.segments_count} | {wal / 2**20:.0f} "
              f"| {(_du(path) - wal) / 2**20:.0f} | {swept} |", flush=True)

    warm: list[tracemalloc.Snapshot] = []
    for i in range(args.stores):
        key = chat_key(prompt(rng, i), tenant=f"t{i % 4}")
        await cache.lookup(key)
        await cache.store(key, answer, TokenUsage(40, 120, 0))
        sim[0] += 1.0 / args.rate
        if sim[0] >= next_sweep:
            swept += await semantic.sweep(sim[0])
            next_sweep += args.sweep
        if i % args.sample == 0 or i == args.stores - 1:
            await cache.flush_counters()
            await sample(i)
        if args.tracemalloc and not warm and sim[0] - start >= 2 * (args.ttl + args.stale):
            warm.append(tracemalloc.take_snapshot())
    if warm:
        print("# Python heap growth since the warm-up ended (tracemalloc, top 8 lines):")
        for stat in tracemalloc.take_snapshot().compare_to(warm[0], "lineno")[:8]:
            print(f"#   {stat}")
    await cache.aclose()
    await vectors.aclose()
    # This run's keys only (never flush a shared Redis): tens of thousands of them would slow others' SCANs.
    batch: list[bytes] = []
    async for k in client.scan_iter(match=f"{prefix}*", count=10_000):
        batch.append(k)
        if len(batch) >= 1_000:
            await client.unlink(*batch)
            batch.clear()
    if batch:
        await client.unlink(*batch)
    await client.aclose()
    shutil.rmtree(root, ignore_errors=True)
    print(f"# {time.perf_counter() - wall0:.0f}s wall", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", type=int, default=40_000)
    p.add_argument("--rate", type=float, default=26.0, help="stores per simulated second")
    p.add_argument("--ttl", type=int, default=120)
    p.add_argument("--stale", type=int, default=60)
    p.add_argument("--sweep", type=float, default=30.0, help="simulated seconds between sweeps")
    p.add_argument("--max-entries", type=int, default=DEFAULT_MAX_ENTRIES, help="the vector store's capacity")
    p.add_argument("--sample", type=int, default=2_000, help="print a row every this many stores")
    p.add_argument("--tracemalloc", action="store_true", help="also trace the Python heap (slower)")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
