from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.retrieval.embedding import ChunkEmbedder, HashingEmbedder

ROOT = Path(__file__).resolve().parents[3]

DOCS = [
    "The invoice for the quarterly cloud bill was paid by the finance team.",
    "Our hiking trip to the mountains was cancelled because of heavy snow.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose.",
    "The espresso machine in the kitchen needs descaling every month.",
    "Kubernetes pods restart when the liveness probe fails repeatedly.",
]


def test_is_an_embedder_with_unit_float32_rows() -> None:
    emb = HashingEmbedder(384)
    assert isinstance(emb, ChunkEmbedder)
    out = emb.embed([*DOCS, "?!", ""])
    assert out.shape == (len(DOCS) + 2, 384)
    assert out.dtype == np.float32
    norms = np.linalg.norm(out, axis=1)
    assert np.allclose(norms[:-1], 1.0, atol=1e-5)  # punctuation-only text still gets a vector
    assert norms[-1] == 0.0  # empty text is the zero vector


def test_deterministic_within_and_across_processes() -> None:
    emb = HashingEmbedder(64)
    a = emb.embed(["Same text, same vector."])
    assert np.array_equal(a, HashingEmbedder(64).embed(["Same text, same vector."]))
    # A fresh interpreter (different PYTHONHASHSEED) gives the same bytes: the hash is stable.
    code = ("from services.retrieval.embedding import HashingEmbedder;"
            "print(HashingEmbedder(64).embed(['Same text, same vector.']).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345"}, cwd=ROOT)
    assert out.stdout.strip() == a.tobytes().hex()


def test_case_insensitive() -> None:
    emb = HashingEmbedder()
    a, b = emb.embed(["Quarterly Cloud Bill", "quarterly cloud bill"])
    assert np.allclose(a, b)


def test_query_sharing_words_ranks_its_document_first() -> None:
    emb = HashingEmbedder()
    docs = emb.embed(DOCS)
    queries = {
        "who paid the cloud invoice": 0,
        "snow in the mountains": 1,
        "how does photosynthesis make glucose": 2,
        "descaling the espresso machine": 3,
        "liveness probe restarts": 4,
    }
    for query, expected in queries.items():
        scores = docs @ emb.embed([query])[0]
        assert int(np.argmax(scores)) == expected, (query, scores)


def test_inflections_still_match_via_char_ngrams() -> None:
    emb = HashingEmbedder()
    docs = emb.embed(DOCS)
    scores = docs @ emb.embed(["restarting pod"])[0]
    assert int(np.argmax(scores)) == 4


def test_model2vec_embedder_loads_offline_and_ranks_by_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    from libs import static_model as model_setup
    from services.retrieval.embedding import Model2VecEmbedder

    if not model_setup.is_prepared(model_setup.DEFAULT_DIR):
        if os.environ.get("CI"):
            pytest.fail("make setup must prepare the retrieval model")
        pytest.skip("retrieval model not prepared: run `python -m libs.static_model`")
    # Any attempt to reach the network would fail loudly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    emb = Model2VecEmbedder(model_setup.DEFAULT_DIR, name=model_setup.MODEL_NAME)
    assert isinstance(emb, ChunkEmbedder)
    assert (emb.name, emb.dim) == ("m2v-minilm-l6-v2-256", 256)
    out = emb.embed(DOCS)
    assert out.shape == (len(DOCS), 256) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert emb.embed([]).shape == (0, 256)
    # Meaning, not shared words: no query below shares a content word with its document.
    queries = {
        "settling accounts for our servers": 0,
        "alpine walk called off due to the weather": 1,
        "how plants make sugar from light": 2,
        "coffee maker maintenance": 3,
        "docker containers rebooting after failed checks": 4,
    }
    for query, expected in queries.items():
        assert int(np.argmax(out @ emb.embed([query])[0])) == expected, query
    counter = emb.count_tokens
    assert counter is not None and counter("unbelievably simple", [(0, 12), (13, 19)])[1] == 1
