"""BM25 as sparse vectors: the ``SparseEncoder`` protocol and Qdrant's own BM25 term weighting.

A chunk is stored as a sparse vector of BM25 term weights (term frequency
saturated by ``k`` and normalised by length with ``b`` against ``avg_len``);
the collection multiplies each by the term's IDF at query time
(``Modifier.IDF``), so IDF is always current, and it is computed over the
caller's own tenant only (``IdfParams(corpus=tenant filter)``): another
tenant's documents never change a tenant's scores. A query is the set of its
terms, each of weight 1, so the dot product is the BM25 score.

Tokenizing (lowercase, English stop words, Snowball English stemmer) and the
term ids (stable hashes of the stemmed terms, no vocabulary to keep) come from
``qdrant_edge.Bm25``: the same code the Qdrant server uses for its BM25, so
vectors are the same whether the store is embedded or a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Qdrant's defaults; avg_len should be the typical chunk length in words (after stop words are removed).
DEFAULT_K = 1.2
DEFAULT_B = 0.75
DEFAULT_AVG_LEN = 256.0


@dataclass(frozen=True)
class SparseVector:
    """Term ids and their weights (ids unique)."""

    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.values):
            raise ValueError("a sparse vector needs one value per index")

    def __bool__(self) -> bool:
        return bool(self.indices)


class SparseEncoder(Protocol):
    """Maps texts to sparse term-weight vectors; the store applies IDF."""

    @property
    def name(self) -> str:
        """Identifies the term space (tokenizer and weighting): vectors of different names never mix."""
        ...

    def embed_documents(self, texts: list[str]) -> list[SparseVector]: ...

    def embed_query(self, text: str) -> SparseVector: ...


class Bm25Encoder:
    """BM25 term weights by ``qdrant_edge.Bm25`` (English tokenizer, stop words and stemmer)."""

    def __init__(self, *, k: float = DEFAULT_K, b: float = DEFAULT_B, avg_len: float = DEFAULT_AVG_LEN) -> None:
        import qdrant_edge

        self._bm25 = qdrant_edge.Bm25(qdrant_edge.Bm25Config(k=k, b=b, avg_len=avg_len, language="english"))

    @property
    def name(self) -> str:
        # Parameters are not part of the name: they change weights, not which term an id means.
        return "bm25-en"

    def embed_documents(self, texts: list[str]) -> list[SparseVector]:
        out: list[SparseVector] = []
        for text in texts:
            vec = self._bm25.embed_document(text)
            out.append(SparseVector(tuple(vec.indices), tuple(vec.values)))
        return out

    def embed_query(self, text: str) -> SparseVector:
        vec = self._bm25.embed_query(text)
        return SparseVector(tuple(vec.indices), tuple(vec.values))
