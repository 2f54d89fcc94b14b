"""The verification stage of the semantic tier: is the cached prompt really the same question?

A gradient-boosted tree ensemble over ``features.pair_features`` gives a probability
that the two prompts ask the same thing; a candidate is served when it reaches the
namespace's operating point (a probability threshold). Two exact checks come first
and cannot be outvoted: different numbers, and negation on one side only.

The model is our own small artifact, ``services/cache/models/verifier.json``, written
by ``python -m services.cache.verifier_training`` (how it was trained is recorded
in the file). It is evaluated here with numpy only: no training library at run time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cache.embedding import Analysis
from services.cache.features import FEATURE_NAMES, hard_veto, pair_features

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "verifier.json"
MODEL_FORMAT = "tollgate-verifier/1"


class TreeEnsemble:
    """Binary GBDT: the sum of the trees' leaf values, through a sigmoid.

    Each tree is flat arrays: ``feature[i]`` (-1 for a leaf), ``threshold[i]``, ``left[i]``,
    ``right[i]``, ``value[i]`` (leaf output), ``default_left[i]`` (NaN goes left).
    A split sends ``x[feature] <= threshold`` left, as LightGBM does.
    """

    def __init__(self, trees: list[dict[str, list[float]]]):
        self._trees = [
            (np.asarray(t["feature"], dtype=np.int64), np.asarray(t["threshold"], dtype=np.float64),
             np.asarray(t["left"], dtype=np.int64), np.asarray(t["right"], dtype=np.int64),
             np.asarray(t["value"], dtype=np.float64), np.asarray(t["default_left"], dtype=bool))
            for t in trees
        ]
        # Plain lists for the per-pair path: indexing numpy scalars one by one is slower than lists.
        self._lists = [tuple(a.tolist() for a in tree) for tree in self._trees]

    def __len__(self) -> int:
        return len(self._trees)

    def raw_one(self, x: list[float]) -> float:
        total = 0.0
        for feature, threshold, left, right, value, default_left in self._lists:
            i = 0
            while (f := feature[i]) >= 0:
                v = x[f]
                go_left = default_left[i] if v != v else v <= threshold[i]  # v != v: NaN
                i = left[i] if go_left else right[i]
            total += value[i]
        return total

    def raw(self, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Raw scores of many rows (evaluation, training checks)."""
        out = np.zeros(len(x), dtype=np.float64)
        rows = np.arange(len(x))
        for feature, threshold, left, right, value, default_left in self._trees:
            node = np.zeros(len(x), dtype=np.int64)
            while True:
                f = feature[node]
                inner = f >= 0
                if not inner.any():
                    break
                v = x[rows, np.where(inner, f, 0)]
                go_left = np.where(np.isnan(v), default_left[node], v <= threshold[node])
                node = np.where(inner, np.where(go_left, left[node], right[node]), node)
            out += value[node]
        return out


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@dataclass(frozen=True)
class Verdict:
    accept: bool
    score: float  # model probability (0 when vetoed)
    reason: str  # "accepted", "below_threshold", or the veto's name


class Verifier:
    """Scores (new prompt, cached prompt) pairs; the threshold is the caller's operating point."""

    def __init__(self, model: TreeEnsemble, *, default_threshold: float, embedder_fingerprint: str = "",
                 metadata: dict[str, Any] | None = None):
        self.model = model
        self.default_threshold = default_threshold
        self.embedder_fingerprint = embedder_fingerprint
        self.metadata = metadata or {}

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> Verifier:
        doc = json.loads(path.read_text())
        if doc.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a {MODEL_FORMAT} file")
        if tuple(doc["features"]) != FEATURE_NAMES:
            raise ValueError(f"{path}: trained on other features than this code computes; retrain it")
        return cls(TreeEnsemble(doc["trees"]), default_threshold=float(doc["default_threshold"]),
                   embedder_fingerprint=str(doc.get("embedder_fingerprint", "")), metadata=doc.get("training", {}))

    def score(self, a: Analysis, b: Analysis) -> float:
        return sigmoid(self.model.raw_one(pair_features(a, b)))

    def verify(self, a: Analysis, b: Analysis, threshold: float | None = None) -> Verdict:
        veto = hard_veto(a, b)
        if veto is not None:
            return Verdict(False, 0.0, veto)
        p = self.score(a, b)
        t = self.default_threshold if threshold is None else threshold
        return Verdict(p >= t, p, "accepted" if p >= t else "below_threshold")
