"""Text embedders: ``Embedder`` protocol and an offline feature-hashing implementation.

The service only needs ``dim`` and ``embed(texts)``; a model-backed embedder
(MiniLM / model2vec) slots in behind the same protocol later.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

_WORD = re.compile(r"\w+")

# Relative weight of each feature family: whole words carry the meaning, bigrams
# reward phrase matches, character n-grams give robustness to inflection and typos
# without drowning out the words (a word yields ~10 of them).
_WORD_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.5
_CHAR_WEIGHT = 0.15
# Without corpus statistics (no IDF) function words would dominate short texts; they keep a
# small weight, so a query made only of them still matches, but cannot outvote content words.
_STOPWORD_WEIGHT = 0.1
_STOPWORDS = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "had", "has", "have", "he", "her",
    "his", "i", "if", "in", "into", "is", "it", "its", "me", "my", "no", "not", "of", "on", "or", "our", "she",
    "so", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "to", "us", "was",
    "we", "were", "what", "when", "where", "which", "who", "why", "will", "with", "you", "your",
})


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """One row per text, shape ``(len(texts), dim)``, each row of unit L2 norm (zero only for empty text)."""
        ...


def _hash_bucket(feature: str, dim: int) -> tuple[int, float]:
    """Stable (process- and platform-independent) bucket and sign of a feature."""
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) == 0 else -1.0)


_cached_bucket = lru_cache(maxsize=1 << 17)(_hash_bucket)


def _bucket(feature: str, dim: int) -> tuple[int, float]:
    # Only short features are worth caching (and safe to keep in memory).
    return _cached_bucket(feature, dim) if len(feature) <= 64 else _hash_bucket(feature, dim)


def _features(text: str) -> dict[str, float]:
    """Weighted features of ``text``: word unigrams, word bigrams, char 3/4-grams of each word."""
    words = _WORD.findall(text.lower())
    unigrams = Counter(words)
    bigrams = Counter(pairwise(words))
    chars: Counter[str] = Counter()
    for word, count in unigrams.items():
        if word in _STOPWORDS:
            continue
        padded = f"<{word}>"
        for n in (3, 4):
            for i in range(len(padded) - n + 1):
                chars[f"{n}:{padded[i:i + n]}"] += count
    features: dict[str, float] = {}
    for word, tf in unigrams.items():
        # Sublinear term frequency: a word repeated 100 times is not 100 times as relevant.
        weight = _STOPWORD_WEIGHT if word in _STOPWORDS else _WORD_WEIGHT
        features[f"w:{word}"] = weight * (1.0 + math.log(tf))
    for (a, b), tf in bigrams.items():
        weight = _STOPWORD_WEIGHT if a in _STOPWORDS and b in _STOPWORDS else _BIGRAM_WEIGHT
        features[f"b:{a} {b}"] = weight * (1.0 + math.log(tf))
    for gram, tf in chars.items():
        features[f"c:{gram}"] = _CHAR_WEIGHT * (1.0 + math.log(tf))
    if not features:
        stripped = text.strip()
        if stripped:
            # Punctuation-only text still gets a (self-similar) vector rather than zero.
            features[f"r:{stripped}"] = 1.0
    return features


class HashingEmbedder:
    """Deterministic, offline embedding by signed feature hashing.

    A **lexical stand-in** until the model-backed embedder lands: similarity
    reflects shared words, phrases and word fragments, not meaning (no synonyms).
    Lowercased word unigrams and bigrams plus character 3/4-grams of each word are
    hashed with BLAKE2b into ``dim`` signed buckets, weighted by sublinear term
    frequency (common English function words weigh a tenth and add no character
    n-grams; there is no IDF), and the vector is L2-normalised, so cosine
    similarity behaves like a TF-weighted overlap score. Same text, same vector,
    on every machine and in every process.
    """

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise ValueError("dim must be at least 8")
        self._dim = dim

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), self._dim), dtype=np.float64)
        for row, text in enumerate(texts):
            vec = out[row]
            for feature, weight in _features(text).items():
                index, sign = _bucket(feature, self._dim)
                vec[index] += sign * weight
            norm = float(np.linalg.norm(vec))
            if norm > 0.0:
                vec /= norm
        return out.astype(np.float32)
