"""The verifier trusts another distillation of its embedding model only when the probe pairs agree."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from services.cache.embedding import Analysis, StaticEmbedder
from services.cache.semantic import SemanticTier, UnavailableTier
from services.cache.server import build_semantic
from services.cache.settings import CacheSettings
from services.cache.verifier import DEFAULT_MODEL_PATH, PROBE_TOLERANCE, Verifier
from tests.unit.cache.cache_test_support import static_model_dir
from tools.train_verifier import PROBE_PAIRS


class RelabelledEmbedder:
    """The same vectors under another fingerprint, optionally bent: what another machine's distillation
    (bit-level differences only) or another embedding model (different vectors) would look like."""

    def __init__(self, inner: StaticEmbedder, fingerprint: str, *, noise: float = 0.0):
        self._inner = inner
        self._fingerprint = fingerprint
        self._noise = noise
        self._rng = np.random.default_rng(7)

    @property
    def dim(self) -> int:
        return self._inner.dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def analyze(self, text: str) -> Analysis:
        a = self._inner.analyze(text)
        if not self._noise:
            return a

        def bend(m: np.ndarray) -> np.ndarray:
            m = m + self._rng.normal(scale=self._noise, size=m.shape).astype(np.float32)
            norms = np.linalg.norm(m, axis=-1, keepdims=True)
            return (m / np.where(norms == 0, 1, norms)).astype(np.float32)

        return dataclasses.replace(a, vector=bend(a.vector), word_vectors=bend(a.word_vectors))


@pytest.fixture(scope="module")
def embedder() -> StaticEmbedder:
    return StaticEmbedder(static_model_dir())


def test_the_shipped_model_records_its_embedding_and_probes() -> None:
    doc = json.loads(DEFAULT_MODEL_PATH.read_text())
    assert doc["embedder_fingerprint"].startswith("m2v-256-")
    probes = doc["embedder_probes"]
    assert [(p["a"], p["b"]) for p in probes] == list(PROBE_PAIRS)
    # Probes spread over the score range, so a changed embedding moves some of them.
    scores = [p["p"] for p in probes]
    assert min(scores) < 0.3 and max(scores) > 0.7


def test_the_same_embedding_is_accepted_and_scores_the_probes_as_recorded(embedder: StaticEmbedder) -> None:
    verifier = Verifier.load()
    relabelled = RelabelledEmbedder(embedder, verifier.embedder_fingerprint)
    assert verifier.embedder_mismatch(relabelled) is None
    for p in verifier.probes:
        assert verifier.score(embedder.analyze(p["a"]), embedder.analyze(p["b"])) == pytest.approx(p["p"], abs=0.02)


def test_another_distillation_with_the_same_vectors_is_accepted(embedder: StaticEmbedder) -> None:
    verifier = Verifier.load()
    assert verifier.embedder_mismatch(RelabelledEmbedder(embedder, "m2v-256-othermachine")) is None
    assert verifier.metadata["probe_max_abs_diff"] <= PROBE_TOLERANCE


def test_another_embedding_is_refused(embedder: StaticEmbedder) -> None:
    verifier = Verifier.load()
    reason = verifier.embedder_mismatch(RelabelledEmbedder(embedder, "m2v-256-another-model", noise=0.2))
    assert reason is not None and "probe scores off by" in reason and "retrain" in reason


def test_a_model_without_probes_refuses_any_other_fingerprint(embedder: StaticEmbedder) -> None:
    verifier = Verifier.load()
    bare = Verifier(verifier.model, default_threshold=verifier.default_threshold,
                    embedder_fingerprint=verifier.embedder_fingerprint)
    assert bare.embedder_mismatch(RelabelledEmbedder(embedder, verifier.embedder_fingerprint)) is None
    assert bare.embedder_mismatch(RelabelledEmbedder(embedder, "m2v-256-othermachine")) is not None


async def test_the_service_turns_the_semantic_tier_off_when_the_embedding_is_not_the_trained_one(
        tmp_path: Path) -> None:
    doc = json.loads(DEFAULT_MODEL_PATH.read_text())
    # Recorded under another embedding, whose probe scores this one does not reproduce.
    doc["embedder_fingerprint"] = "m2v-256-another-model"
    doc["embedder_probes"] = [{**p, "p": 1.0 - p["p"]} for p in doc["embedder_probes"]]
    model = tmp_path / "verifier.json"
    model.write_text(json.dumps(doc))
    settings = CacheSettings(embedding_model_dir=str(static_model_dir()), verifier_model_path=str(model),
                             data_dir=str(tmp_path))
    tier, vectors = build_semantic(settings, lambda _k, _r: None)
    assert isinstance(tier, UnavailableTier) and vectors is None
    health = tier.health()
    assert health.degraded and "retrain" in health.detail

    settings = CacheSettings(embedding_model_dir=str(static_model_dir()), data_dir=str(tmp_path))
    tier, vectors = build_semantic(settings, lambda _k, _r: None)
    assert isinstance(tier, SemanticTier) and vectors is not None
    await vectors.aclose()
