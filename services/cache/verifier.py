"""The verification stage of the semantic tier: is the cached prompt really the same question?

A gradient-boosted tree ensemble over ``features.pair_features`` gives a probability
that the two prompts ask the same thing; a candidate is served when it reaches the
namespace's operating point (a probability threshold). Two exact checks come first
and cannot be outvoted: different numbers, and negation on one side only.

The model is our own small artifact, ``services/cache/models/verifier.json``, written
by ``python -m tools.train_verifier`` (how it was trained is recorded
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

from services.cache.embedding import Analysis, AnalyzingEmbedder
from services.cache.features import FEATURE_NAMES, hard_veto, pair_features

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "verifier.json"
MODEL_FORMAT = "tollgate-verifier/1"
# Another distillation of the embedding model (other fingerprint: other BLAS, other thread count) is trusted only
# when it scores the model file's probe pairs within this of what the training embedding scored.
PROBE_TOLERANCE = 0.02


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
                 metadata: dict[str, Any] | None = None, probes: list[dict[str, Any]] | None = None):
        self.model = model
        self.default_threshold = default_threshold
        self.embedder_fingerprint = embedder_fingerprint
        self.metadata = metadata or {}
        # (prompt a, prompt b, probability under the training embedding): see embedder_mismatch.
        self.probes = probes or []

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> Verifier:
        doc = json.loads(path.read_text())
        if doc.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path}: not a {MODEL_FORMAT} file")
        if tuple(doc["features"]) != FEATURE_NAMES:
            raise ValueError(f"{path}: trained on other features than this code computes; retrain it")
        return cls(TreeEnsemble(doc["trees"]), default_threshold=float(doc["default_threshold"]),
                   embedder_fingerprint=str(doc.get("embedder_fingerprint", "")), metadata=doc.get("training", {}),
                   probes=list(doc.get("embedder_probes") or []))

    def embedder_mismatch(self, embedder: AnalyzingEmbedder) -> str | None:
        """Why this model must not verify with ``embedder`` (None: it may).

        The trees split on cosines and word-vector alignments of the embedding they were trained with. The same
        distillation on another machine can differ in the last bits (another fingerprint) and is fine; another
        embedding model is not, and would make the verifier wave through wrong answers. So a different
        fingerprint is accepted only when the stored probe pairs score as they did in training.
        """
        if not self.embedder_fingerprint or self.embedder_fingerprint == embedder.fingerprint:
            return None
        if not self.probes:
            return (f"the verifier was trained with embedder {self.embedder_fingerprint}, not {embedder.fingerprint}, "
                    "and has no probes to compare them: retrain it (python -m tools.train_verifier)")
        worst = max(abs(self.score(embedder.analyze(str(p["a"])), embedder.analyze(str(p["b"]))) - float(p["p"]))
                    for p in self.probes)
        if worst > PROBE_TOLERANCE:
            return (f"embedder {embedder.fingerprint} differs from the verifier's training one "
                    f"({self.embedder_fingerprint}): probe scores off by {worst:.3f} > {PROBE_TOLERANCE}; retrain it "
                    "(python -m tools.train_verifier)")
        self.metadata = {**self.metadata, "probe_max_abs_diff": round(worst, 6)}
        return None

    def score(self, a: Analysis, b: Analysis) -> float:
        return sigmoid(self.model.raw_one(pair_features(a, b)))

    def verify(self, a: Analysis, b: Analysis, threshold: float | None = None) -> Verdict:
        veto = hard_veto(a, b)
        if veto is not None:
            return Verdict(False, 0.0, veto)
        p = self.score(a, b)
        t = self.default_threshold if threshold is None else threshold
        return Verdict(p >= t, p, "accepted" if p >= t else "below_threshold")
