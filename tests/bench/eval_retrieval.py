"""Retrieval quality on BEIR DBpedia (../shared/data/beir_dbpedia): nDCG@10 and recall@5, dense vs BM25 vs hybrid.

Runs the service's own code path (``DocumentIndex``: chunking, embedder, BM25
encoder, embedded Qdrant Edge store, RRF fusion), one run per embedder, all
three modes over the same index:

    .venv/bin/python -m tests.bench.eval_retrieval                  # default embedder (model2vec)
    .venv/bin/python -m tests.bench.eval_retrieval --embedder model2vec --embedder minilm --embedder hashing

A document is ``title + "\\n" + text``. Metrics follow BEIR (pytrec_eval):
graded gain 2^rel - 1 with log2 discount for nDCG@10; recall@5 counts
documents judged relevant (score >= 1). Ranked lists are of documents (a
document's rank is that of its best chunk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from libs.deadlines import Deadline
from services.retrieval.chunking import ChunkingOptions
from services.retrieval.edge_store import EdgeVectorStore
from services.retrieval.embedding import ChunkEmbedder
from services.retrieval.index import Document, DocumentIndex
from services.retrieval.sparse import DEFAULT_AVG_LEN, Bm25Encoder
from services.retrieval.store import SearchMode

DATA = Path(os.environ.get("TOLLGATE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
BEIR_DIR = DATA / "beir_dbpedia"
TENANT = "beir"
MODES = (SearchMode.DENSE, SearchMode.SPARSE, SearchMode.HYBRID)
MODE_LABEL = {SearchMode.DENSE: "dense only", SearchMode.SPARSE: "BM25 only", SearchMode.HYBRID: "hybrid (RRF k=60)"}


@dataclass(frozen=True)
class Beir:
    documents: list[Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


@dataclass(frozen=True)
class Metrics:
    ndcg_at_10: float
    recall_at_5: float
    search_ms_p50: float


def load_beir(folder: Path = BEIR_DIR) -> Beir:
    documents = []
    with (folder / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            documents.append(Document(row["_id"], f"{row.get('title', '')}\n{row['text']}".strip()))
    queries = {}
    with (folder / "queries.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            queries[row["_id"]] = row["text"]
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / "test.tsv").open(encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            qid, doc_id, score = line.rstrip("\n").split("\t")
            qrels.setdefault(qid, {})[doc_id] = int(score)
    return Beir(documents, {q: t for q, t in queries.items() if q in qrels}, qrels)


def ndcg_at(ranked: Sequence[str], rels: dict[str, int], k: int = 10) -> float:
    dcg = sum((2 ** rels.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted(rels.values(), reverse=True)[:k]
    idcg = sum((2 ** r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], rels: dict[str, int], k: int = 5) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


def make_embedder(name: str) -> ChunkEmbedder:
    from libs import static_model as model_setup
    from services.retrieval.embedding import HashingEmbedder, Model2VecEmbedder, SentenceTransformerEmbedder

    if name == "hashing":
        return HashingEmbedder(384)
    if name == "minilm":
        return SentenceTransformerEmbedder(name="minilm-l6-v2-384")
    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        model_setup.distill(model_setup.DEFAULT_DIR)
    return Model2VecEmbedder(model_setup.DEFAULT_DIR, name=model_setup.MODEL_NAME)


async def evaluate(embedder: ChunkEmbedder, beir: Beir, *, bm25_avg_len: float = DEFAULT_AVG_LEN,
                   chunking: ChunkingOptions = ChunkingOptions(512, 128),
                   batch: int = 256) -> tuple[dict[SearchMode, Metrics], float]:
    """Metrics per mode and ingest throughput (chunks/s) for one embedder."""
    store = EdgeVectorStore(None, dim=embedder.dim, dense_vector=f"dense-{embedder.name}", call_timeout_s=60)
    index = DocumentIndex(embedder, store, default_chunking=chunking, sparse=Bm25Encoder(avg_len=bm25_avg_len))
    try:
        started, chunks = time.perf_counter(), 0
        for i in range(0, len(beir.documents), batch):
            ingested = await index.ingest(TENANT, beir.documents[i:i + batch], deadline=Deadline.after(600))
            chunks += sum(d.chunk_count for d in ingested)
        ingest_rate = chunks / (time.perf_counter() - started)
        results: dict[SearchMode, Metrics] = {}
        for mode in MODES:
            ndcgs, recalls, latencies = [], [], []
            for qid, text in beir.queries.items():
                t0 = time.perf_counter()
                hits = await index.search(TENANT, text, 50, mode=mode, deadline=Deadline.after(60))
                latencies.append(time.perf_counter() - t0)
                ranked = list(dict.fromkeys(h.document_id for h in hits))
                ndcgs.append(ndcg_at(ranked, beir.qrels[qid]))
                recalls.append(recall_at(ranked, beir.qrels[qid]))
            results[mode] = Metrics(statistics.fmean(ndcgs), statistics.fmean(recalls),
                                    statistics.median(latencies) * 1000)
        return results, ingest_rate
    finally:
        await store.close()


def table(rows: list[tuple[str, dict[SearchMode, Metrics], float]]) -> str:
    lines = ["| embedder | retriever | nDCG@10 | recall@5 | search p50 (ms, in-process) | ingest (chunks/s) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, results, rate in rows:
        for mode in MODES:
            m = results[mode]
            lines.append(f"| {name} | {MODE_LABEL[mode]} | {m.ndcg_at_10:.4f} | {m.recall_at_5:.4f} | "
                         f"{m.search_ms_p50:.2f} | {rate:.0f} |")
        best_single = max(results[SearchMode.DENSE].ndcg_at_10, results[SearchMode.SPARSE].ndcg_at_10)
        gain = (results[SearchMode.HYBRID].ndcg_at_10 - best_single) * 100
        lines.append(f"| {name} | hybrid - best single | {gain:+.1f} points | | | |")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> None:
    if not BEIR_DIR.is_dir():
        raise SystemExit(f"no BEIR data at {BEIR_DIR} (set TOLLGATE_SHARED_DATA)")
    beir = load_beir()
    rows = []
    for name in args.embedder or ["model2vec"]:
        embedder = make_embedder(name)
        print(f"evaluating {embedder.name} on {len(beir.documents)} documents, {len(beir.queries)} queries",
              file=sys.stderr)
        results, rate = await evaluate(embedder, beir, bm25_avg_len=args.bm25_avg_len)
        rows.append((embedder.name, results, rate))
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--embedder", action="append", choices=["model2vec", "minilm", "hashing"])
    parser.add_argument("--bm25-avg-len", type=float, default=DEFAULT_AVG_LEN)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
