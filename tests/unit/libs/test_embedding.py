"""libs.embedding: the one embedder protocol (every service's embedders satisfy it) and row normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from libs.embedding import Embedder, unit_rows
from services.cache.embedding import StaticEmbedder
from services.retrieval.embedding import HashingEmbedder
from tests.unit.cache.cache_test_support import static_model_dir


def test_unit_rows_normalises_each_row_and_keeps_zero_rows_zero() -> None:
    m = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=np.float64)
    before = m.copy()
    out = unit_rows(m)
    assert out.dtype == np.float32 and out.shape == (3, 2)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-6)
    assert np.array_equal(m, before)  # the input is left alone


def test_unit_rows_of_a_float32_input_is_a_new_array() -> None:
    m = np.array([[2.0, 0.0]], dtype=np.float32)
    out = unit_rows(m)
    out[0, 0] = 7.0
    assert m[0, 0] == 2.0


def test_unit_rows_turns_a_vector_into_one_row_and_keeps_empty_input_empty() -> None:
    np.testing.assert_allclose(unit_rows(np.array([0.0, 5.0])), [[0.0, 1.0]])
    empty = unit_rows(np.zeros((0, 4), dtype=np.float32))
    assert empty.shape == (0, 4) and empty.dtype == np.float32


class _NotAnEmbedder:
    @property
    def dim(self) -> int:
        return 3


def test_the_protocol_needs_name_dim_and_embed() -> None:
    assert not isinstance(_NotAnEmbedder(), Embedder)
    assert isinstance(HashingEmbedder(32), Embedder)


def test_the_cache_embedder_is_an_embedder_whose_rows_are_its_sentence_vectors() -> None:
    emb = StaticEmbedder(static_model_dir())
    assert isinstance(emb, Embedder)
    assert emb.name == emb.fingerprint
    texts = ["How do I reset my password?", "", "Where is my card?"]
    rows = emb.embed(texts)
    assert rows.shape == (3, emb.dim) and rows.dtype == np.float32
    for row, text in zip(rows, texts, strict=True):
        assert np.array_equal(row, emb.analyze(text).vector)
    assert np.linalg.norm(rows[0]) == pytest.approx(1.0, abs=1e-5)
    assert not rows[1].any()
    assert emb.embed([]).shape == (0, emb.dim)
