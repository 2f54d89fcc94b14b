from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from services.retrieval.embedding import Embedder, HashingEmbedder

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
    assert isinstance(emb, Embedder)
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
