from __future__ import annotations

from pathlib import Path

import pytest

from libs.settings import SettingsError, load_settings
from services.retrieval.settings import RetrievalSettings


def test_defaults(clean_env: None) -> None:
    s = load_settings(RetrievalSettings)
    assert s.port == 50054
    assert (s.chunk_tokens, s.overlap_tokens, s.max_top_k, s.embedding_dim) == (512, 128, 100, 384)
    assert s.qdrant_url == "" and s.data_dir == "" and s.qdrant_path is None


def test_mesh_wide_and_prefixed_env(clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOLLGATE_QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("TOLLGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_PORT", "6000")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_COLLECTION", "docs_v2")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_CHUNK_TOKENS", "256")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_OVERLAP_TOKENS", "32")
    # A prefixed variant of a mesh-wide setting is not what the mesh uses; it is ignored.
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_QDRANT_URL", "http://wrong:6333")
    s = load_settings(RetrievalSettings)
    assert s.qdrant_url == "http://qdrant:6333"
    assert s.qdrant_path == tmp_path / "qdrant"
    assert (s.port, s.collection, s.chunk_tokens, s.overlap_tokens) == (6000, "docs_v2", 256, 32)


def test_overlap_must_be_smaller_than_chunk(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_CHUNK_TOKENS", "64")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_OVERLAP_TOKENS", "64")
    with pytest.raises(SettingsError):
        load_settings(RetrievalSettings)


def test_retrieval_defaults_and_engine_choice(clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = load_settings(RetrievalSettings)
    assert (s.embedded_engine, s.embedder, s.default_search_mode, s.prefetch_limit) == (
        "edge", "model2vec", "hybrid", 100)
    assert (s.bm25_k, s.bm25_b, s.bm25_avg_len) == (1.2, 0.75, 256.0)
    assert s.edge_path is None
    monkeypatch.setenv("TOLLGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_EMBEDDER", "hashing")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_DEFAULT_SEARCH_MODE", "dense")
    s = load_settings(RetrievalSettings)
    assert s.edge_path == tmp_path / "qdrant-edge" / "tollgate_chunks"
    assert (s.embedder, s.default_search_mode) == ("hashing", "dense")
    monkeypatch.setenv("TOLLGATE_RETRIEVAL_EMBEDDER", "bert-large")
    with pytest.raises(SettingsError):
        load_settings(RetrievalSettings)
