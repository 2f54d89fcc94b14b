"""Ingest a JSONL corpus into the retrieval service over IngestStream, with a progress bar.

    python -m services.retrieval.ingest_cli --tenant acme --jsonl corpus.jsonl --target 127.0.0.1:50054

Each line is a JSON object: ``_id`` / ``id`` / ``document_id`` (required),
``text`` (required), ``title`` (optional, put before the text), ``metadata``
(optional object; values are sent as strings). Documents go in batches of
``--batch`` on one stream; the bar counts documents handed to the stream (gRPC
flow control keeps that within a few batches of what the service has indexed),
and the service's totals are printed at the end. Ingestion is idempotent, so a
failed run can simply be repeated. The bar is tqdm's when installed, else a line
every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import grpc
from tollgate.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc


class Progress(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class _LineProgress:
    """Fallback without tqdm: a status line on stderr at most every ``every_s`` seconds."""

    def __init__(self, total: int, every_s: float = 2.0) -> None:
        self._total, self._done, self._every = total, 0, every_s
        self._started = self._last = time.monotonic()

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= self._every or self._done >= self._total:
            self._last = now
            rate = self._done / max(now - self._started, 1e-9)
            print(f"ingest: {self._done}/{self._total} documents ({rate:.0f}/s)", file=sys.stderr)

    def close(self) -> None:
        pass


def make_progress(total: int, enabled: bool = True) -> Progress:
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total)
    bar: Progress = tqdm(total=total, unit="doc", desc="ingest", disable=not enabled, file=sys.stderr)
    return bar


def _document(row: dict[str, Any], line_no: int) -> retrieval_pb2.Document:
    doc_id = row.get("document_id") or row.get("_id") or row.get("id")
    text = row.get("text")
    if not isinstance(doc_id, str | int) or not isinstance(text, str):
        raise ValueError(f"line {line_no}: needs a string id (_id, id or document_id) and a string text")
    title = row.get("title")
    if isinstance(title, str) and title.strip():
        text = f"{title}\n{text}"
    metadata = row.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"line {line_no}: metadata must be an object")
    return retrieval_pb2.Document(document_id=str(doc_id), text=text,
                                  metadata={str(k): v if isinstance(v, str) else json.dumps(v)
                                            for k, v in metadata.items()})


def read_documents(path: Path) -> Iterator[retrieval_pb2.Document]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                yield _document(json.loads(line), line_no)


def count_documents(path: Path) -> int:
    """How many documents ``path`` holds; reading them all first means a malformed line fails before any upload."""
    return sum(1 for _ in read_documents(path))


async def ingest(target: str, tenant: str, path: Path, *, batch: int = 64, chunk_tokens: int = 0,
                 overlap_tokens: int = 0, timeout_s: float = 3600.0, progress: Progress | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> retrieval_pb2.IngestStreamResponse:
    """Stream the corpus at ``path`` into ``tenant``; the service's totals."""
    chunking = retrieval_pb2.ChunkingOptions(chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)

    async def batches() -> AsyncIterator[retrieval_pb2.IngestStreamRequest]:
        pending: list[retrieval_pb2.Document] = []
        for doc in read_documents(path):
            pending.append(doc)
            if len(pending) == batch:
                yield retrieval_pb2.IngestStreamRequest(batch=retrieval_pb2.IngestRequest(
                    tenant_id=tenant, documents=pending, chunking=chunking))
                # Resumed when gRPC wants the next batch: the previous one has been taken.
                if progress is not None:
                    progress.update(len(pending))
                pending = []
        if pending:
            yield retrieval_pb2.IngestStreamRequest(batch=retrieval_pb2.IngestRequest(
                tenant_id=tenant, documents=pending, chunking=chunking))
            if progress is not None:
                progress.update(len(pending))

    async with grpc.aio.insecure_channel(target) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        response: retrieval_pb2.IngestStreamResponse = await stub.IngestStream(
            batches(), timeout=timeout_s, metadata=metadata or None)
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--jsonl", required=True, type=Path)
    parser.add_argument("--target", default="127.0.0.1:50054", help="retrieval service host:port")
    parser.add_argument("--batch", type=int, default=64, help="documents per stream message")
    parser.add_argument("--chunk-tokens", type=int, default=0, help="0: the service default")
    parser.add_argument("--overlap-tokens", type=int, default=0, help="0: the service default")
    parser.add_argument("--timeout", type=float, default=3600.0, help="deadline for the whole stream, seconds")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if not args.jsonl.is_file():
        parser.error(f"{args.jsonl} is not a file")
    try:
        total = count_documents(args.jsonl)
    except ValueError as exc:  # json.JSONDecodeError is one
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 2
    progress = make_progress(total, enabled=not args.no_progress)
    started = time.monotonic()
    try:
        response = asyncio.run(ingest(args.target, args.tenant, args.jsonl, batch=args.batch,
                                      chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens,
                                      timeout_s=args.timeout, progress=progress))
    except grpc.aio.AioRpcError as exc:
        print(f"\ningest failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    elapsed = time.monotonic() - started
    print(f"ingested {response.documents} documents, {response.chunks} chunks in {elapsed:.1f}s "
          f"({response.chunks / max(elapsed, 1e-9):.0f} chunks/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
