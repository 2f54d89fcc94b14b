"""The reranker hook: an optional second stage that reorders the fused candidates of a search.

``DocumentIndex`` asks the store for ``candidates`` chunks (at least ``top_k``),
hands them to the reranker with the query, and returns the first ``top_k`` of
what it gives back. The candidates are already the caller's tenant's only, so
a reranker cannot widen what a tenant sees. None is configured by default; a
cross-encoder (e.g. ms-marco-MiniLM) would implement :class:`Reranker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

H = TypeVar("H")


class Reranker(Protocol):
    """Reorders candidates by relevance to ``query``; may drop some, must not invent any."""

    @property
    def candidates(self) -> int:
        """How many fused candidates to fetch for reranking (the index fetches at least ``top_k``)."""
        ...

    def rerank(self, query: str, texts: Sequence[str]) -> list[tuple[int, float]]:
        """``(candidate position, new score)`` pairs, best first. Runs in a worker thread (CPU-bound is fine)."""
        ...


def apply_rerank(order: list[tuple[int, float]], hits: Sequence[H], top_k: int) -> list[tuple[H, float]]:
    """The first ``top_k`` hits in the reranker's order, ignoring positions out of range or repeated."""
    seen: set[int] = set()
    out: list[tuple[H, float]] = []
    for position, score in order:
        if 0 <= position < len(hits) and position not in seen:
            seen.add(position)
            out.append((hits[position], float(score)))
            if len(out) == top_k:
                break
    return out
