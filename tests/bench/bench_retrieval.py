"""Retrieval speed over gRPC with 50k chunks: the embedded default (Qdrant Edge) beside qdrant-client local mode.

    .venv/bin/python -m tests.bench.bench_retrieval                 # 50k chunks in 10 tenants
    .venv/bin/python -m tests.bench.bench_retrieval --tenants 1     # one tenant owns all 50k

For each embedded engine, a fresh in-process RetrievalService (default
embedder, in memory) on loopback: the BEIR DBpedia corpus is ingested once per
tenant over IngestStream (batches of 64 documents) until ``--chunks`` chunks
exist, then the BEIR queries are sent one at a time to Search (top 10) in each
mode, rotating over tenants. Ingest throughput is chunks indexed per second of
wall time (chunking, embedding, BM25, upsert). qdrant-client local mode, the
foundation's engine, is the baseline; it is far slower, so it gets fewer chunks
(``--baseline-chunks``, 5k: every ingest batch's stale-chunk delete scans all
points in Python, so its ingest slows down as the collection grows and 50k would
take hours) and fewer queries.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator

import grpc
from tollgate.retrieval.v1 import retrieval_pb2 as pb
from tollgate.retrieval.v1 import retrieval_pb2_grpc

from libs import static_model as model_setup
from libs.grpc_server import GrpcServer
from services.retrieval.server import build
from services.retrieval.settings import RetrievalSettings
from tests.bench.eval_retrieval import BEIR_DIR, load_beir

MODES = [("dense", pb.SEARCH_MODE_DENSE), ("BM25", pb.SEARCH_MODE_SPARSE), ("hybrid", pb.SEARCH_MODE_HYBRID)]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def bench_engine(engine: str, *, chunks_target: int, tenants: int, queries_per_mode: int) -> list[str]:
    beir = load_beir(BEIR_DIR)
    docs = [pb.Document(document_id=d.document_id, text=d.text) for d in beir.documents]
    queries = list(beir.queries.values())
    settings = RetrievalSettings(port=0, embedded_engine=engine, qdrant_timeout_s=120,  # type: ignore[call-arg]
                                 max_request_timeout_s=3600)
    bindings, close = await build(settings)
    server = GrpcServer(settings, bindings)
    await server.start()
    rows: list[str] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            total_chunks = 0
            started = time.perf_counter()
            tenant = 0
            while total_chunks < chunks_target:
                name = f"tenant-{tenant % tenants}"
                suffix = f"@{tenant // tenants}"  # the same corpus again under new ids when tenants < rounds

                async def batches(name: str = name, suffix: str = suffix) -> AsyncIterator[pb.IngestStreamRequest]:
                    for i in range(0, len(docs), 64):
                        yield pb.IngestStreamRequest(batch=pb.IngestRequest(tenant_id=name, documents=[
                            pb.Document(document_id=d.document_id + suffix, text=d.text) for d in docs[i:i + 64]]))

                resp = await stub.IngestStream(batches(), timeout=3600)
                total_chunks += resp.chunks
                tenant += 1
                print(f"{engine}: {total_chunks} chunks ingested", file=sys.stderr)
            ingest_s = time.perf_counter() - started
            rows.append(f"| {engine} | ingest (IngestStream) | {total_chunks} chunks | "
                        f"{total_chunks / ingest_s:.0f} chunks/s | | |")
            for label, mode in MODES:
                latencies: list[float] = []
                for i in range(min(5, queries_per_mode)):  # warm-up
                    await stub.Search(pb.SearchRequest(tenant_id="tenant-0", query=queries[i], top_k=10, mode=mode),
                                      timeout=600)
                for i in range(queries_per_mode):
                    request = pb.SearchRequest(tenant_id=f"tenant-{i % tenants}", query=queries[i % len(queries)],
                                               top_k=10, mode=mode)
                    t0 = time.perf_counter()
                    await stub.Search(request, timeout=600)
                    latencies.append(time.perf_counter() - t0)
                rows.append(f"| {engine} | Search {label}, top 10 | {len(latencies)} queries | | "
                            f"{statistics.median(latencies) * 1000:.2f} | {_pct(latencies, 0.99) * 1000:.2f} |")
                print(rows[-1], file=sys.stderr)
    finally:
        await server.stop(0)
        await close()
    return rows


async def _main(args: argparse.Namespace) -> None:
    if not BEIR_DIR.is_dir():
        raise SystemExit(f"no BEIR data at {BEIR_DIR} (set TOLLGATE_SHARED_DATA)")
    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        model_setup.distill(model_setup.DEFAULT_DIR)
    rows = await bench_engine("edge", chunks_target=args.chunks, tenants=args.tenants, queries_per_mode=args.queries)
    if not args.skip_baseline:
        rows += await bench_engine("local", chunks_target=args.baseline_chunks, tenants=args.tenants,
                                   queries_per_mode=args.baseline_queries)
    print(f"Retrieval over gRPC on loopback, {args.tenants} tenant(s), embedder {model_setup.MODEL_NAME}, "
          f"{platform.machine()} / Python {platform.python_version()}\n")
    print("| engine | operation | size | throughput | p50 (ms) | p99 (ms) |")
    print("|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=50_000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--queries", type=int, default=200, help="Search calls per mode (edge)")
    parser.add_argument("--baseline-chunks", type=int, default=5_000)
    parser.add_argument("--baseline-queries", type=int, default=10, help="Search calls per mode (local mode)")
    parser.add_argument("--skip-baseline", action="store_true")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
