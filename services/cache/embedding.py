"""Sentence embeddings for the semantic tier: a static (model2vec) model, read offline from disk.

A static model is a table of one vector per word piece, distilled from
all-MiniLM-L6-v2 (see ``services/cache/setup_models.py``): a sentence vector is the
mean of its pieces' vectors, about 0.05 ms on one core against ~9 ms for the
transformer. The same table gives per-word vectors, which the verifier uses to
align the content words of two prompts (``services/cache/features.py``).

Only ``tokenizers`` and ``safetensors`` are needed at run time (no torch); the
files are the ones ``model2vec``'s ``save_pretrained`` writes, loaded by
:mod:`libs.static_embedding` (shared with the router's complexity classifier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from libs.embedding import F32, Embedder, unit_rows
from libs.static_embedding import MAX_PIECES, StaticVectors

# Word pieces past MAX_PIECES (512) are ignored: a cache prompt this long is matched exactly or not at all.
__all__ = ["F32", "MAX_PIECES", "Analysis", "AnalyzingEmbedder", "StaticEmbedder"]


@dataclass(frozen=True)
class Analysis:
    """One prompt as the semantic tier sees it: its sentence vector and its words."""

    text: str
    vector: F32  # unit length (all zeros for a text with no known piece)
    words: tuple[str, ...]  # lowercased, accents stripped (the tokenizer's normalizer)
    surface: tuple[str, ...]  # the same words as written (capitalisation kept)
    word_vectors: F32  # (len(words), dim), unit length rows
    # How much each word counts: the norm of its raw vector, which the distillation's SIF weighting
    # makes small for frequent words ("the", "my") and large for rare, informative ones.
    word_weights: F32


@runtime_checkable
class AnalyzingEmbedder(Embedder, Protocol):
    """``libs.embedding.Embedder`` plus what the semantic tier needs: a prompt's words and their vectors."""

    @property
    def fingerprint(self) -> str:
        """Identifies the vector space (the same as ``name``): entries stored under another one are never
        compared; the verifier records the one it was trained with."""
        ...

    def analyze(self, text: str) -> Analysis: ...


class StaticEmbedder:
    """A model2vec static model (``model.safetensors`` + ``tokenizer.json`` + ``config.json``)."""

    def __init__(self, path: Path):
        self.path = path
        self._vectors = StaticVectors(path)
        self._tokenizer = self._vectors.tokenizer
        self._table: F32 = self._vectors.table
        self._unit_table = unit_rows(self._table)
        self._normalize = self._vectors.normalize
        self._unk = self._vectors.unk
        self._fingerprint = self._vectors.fingerprint

    @property
    def dim(self) -> int:
        return int(self._table.shape[1])

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def name(self) -> str:
        return self._fingerprint

    def embed(self, texts: Sequence[str]) -> F32:
        """The sentence vectors of ``texts`` (``analyze(text).vector`` of each), one row per text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row] = self._vectors.embed(text)
        return out

    def analyze(self, text: str) -> Analysis:
        enc = self._tokenizer.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids[:MAX_PIECES], dtype=np.int64)
        if len(ids) == 0:
            empty = np.zeros((0, self.dim), dtype=np.float32)
            return Analysis(text, np.zeros(self.dim, dtype=np.float32), (), (), empty, np.zeros(0, dtype=np.float32))
        known = ids != self._unk
        vector = self._vectors.mean_vector(ids)
        # Group pieces into words (the tokenizer's pre-tokenizer splits on whitespace and punctuation).
        word_ids = enc.word_ids[:len(ids)]
        offsets = enc.offsets[:len(ids)]
        tokens = enc.tokens[:len(ids)]
        starts = [i for i, w in enumerate(word_ids) if i == 0 or w != word_ids[i - 1]]
        ends = [*starts[1:], len(ids)]
        words = tuple("".join(t.removeprefix("##") for t in tokens[s:e]) for s, e in zip(starts, ends, strict=True))
        surface = tuple(text[offsets[s][0]:offsets[e - 1][1]] for s, e in zip(starts, ends, strict=True))
        raw = self._table[ids] * known[:, None]
        summed = np.add.reduceat(raw, starts, axis=0)
        counts = np.asarray(ends) - np.asarray(starts)
        weights = (np.linalg.norm(summed, axis=1) / counts).astype(np.float32)
        return Analysis(text, vector, words, surface, unit_rows(summed), weights)
