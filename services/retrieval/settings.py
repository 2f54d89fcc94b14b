"""Settings of the retrieval service (``TOLLGATE_RETRIEVAL_*``).

Qdrant's address and the data directory are mesh-wide (``TOLLGATE_QDRANT_URL``,
``TOLLGATE_DATA_DIR``). With no Qdrant URL the service runs Qdrant embedded:
Qdrant Edge in-process under ``<data_dir>/qdrant-edge/<collection>`` (default),
or qdrant-client's local mode under ``<data_dir>/qdrant``
(``TOLLGATE_RETRIEVAL_EMBEDDED_ENGINE=local``); in memory when no data
directory is set either.

The dense embedder is the model2vec model prepared by ``make setup``
(``python -m libs.static_model``), all-MiniLM-L6-v2 itself
(``minilm``: better, ~100x slower), or the lexical hashing embedder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from libs.settings import ServiceSettings, shared_env


class RetrievalSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TOLLGATE_RETRIEVAL_", extra="ignore", frozen=True,
                                      populate_by_name=True)

    port: int = Field(50054, ge=0, le=65535)

    # Qdrant server URL (``http://host:6333``); empty means embedded local mode.
    qdrant_url: str = shared_env("qdrant_url", "")  # type: ignore[assignment]
    qdrant_api_key: str = Field("", repr=False)
    # Root of on-disk state; embedded Qdrant lives in ``<data_dir>/qdrant``. Empty: in memory.
    data_dir: str = shared_env("data_dir", "")  # type: ignore[assignment]
    collection: str = Field("tollgate_chunks", min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$")
    # Upper bound on any single Qdrant call (also capped by the request deadline).
    qdrant_timeout_s: float = Field(5.0, gt=0, le=120)

    # Default chunking; a request may override both within the bounds below.
    chunk_tokens: int = Field(512, ge=1)
    overlap_tokens: int = Field(128, ge=0)
    max_chunk_tokens: int = Field(4096, ge=1)

    max_top_k: int = Field(100, ge=1, le=10_000)

    # Embedded engine when no Qdrant URL is set.
    embedded_engine: Literal["edge", "local"] = "edge"
    # Dense embedder; model_dir overrides where the model2vec model is read from (default: make setup's folder).
    embedder: Literal["model2vec", "minilm", "hashing"] = "model2vec"
    model_dir: str = ""
    # Dimension of the hashing embedder only (the models have their own).
    embedding_dim: int = Field(384, ge=8, le=65_536)
    # Search mode when a request leaves it unspecified.
    default_search_mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    # Candidates each retriever hands to the RRF fusion in hybrid mode.
    prefetch_limit: int = Field(100, ge=1, le=10_000)
    # BM25: term-frequency saturation, length normalisation, and the typical chunk length in words
    # (after stop words). Changing them affects chunks ingested afterwards only.
    bm25_k: float = Field(1.2, ge=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    bm25_avg_len: float = Field(256.0, gt=0)

    # Request bounds.
    max_documents_per_request: int = Field(1000, ge=1)
    max_document_bytes: int = Field(1_048_576, ge=1)
    max_query_chars: int = Field(4096, ge=1)
    # Deadline when the caller sets none, and the most any request may take.
    request_timeout_s: float = Field(30.0, gt=0)
    max_request_timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check_chunking(self) -> RetrievalSettings:
        if self.chunk_tokens > self.max_chunk_tokens:
            raise ValueError("chunk_tokens must not exceed max_chunk_tokens")
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self

    @property
    def qdrant_path(self) -> Path | None:
        """Directory of qdrant-client's local mode, or None for in-memory (only used without ``qdrant_url``)."""
        return Path(self.data_dir) / "qdrant" if self.data_dir else None

    @property
    def edge_path(self) -> Path | None:
        """Directory of the embedded Qdrant Edge shard, or None for in-memory (only used without ``qdrant_url``)."""
        return Path(self.data_dir) / "qdrant-edge" / self.collection if self.data_dir else None
