"""The semantic tier's embedding model: the shared static model of :mod:`libs.static_model`
(distilled offline from all-MiniLM-L6-v2 by ``make setup``), or the folder named by
``TOLLGATE_CACHE_EMBEDDING_MODEL_DIR``. ``python -m services.cache.setup_models`` prepares and checks it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from libs import static_model
from services.cache.embedding import StaticEmbedder

log = logging.getLogger(__name__)

def default_model_dir() -> Path:
    """``TOLLGATE_CACHE_EMBEDDING_MODEL_DIR``, else the shared static model that ``make setup`` prepares."""
    explicit = os.environ.get("TOLLGATE_CACHE_EMBEDDING_MODEL_DIR", "")
    return Path(explicit) if explicit else static_model.DEFAULT_DIR


def model_ready(path: Path) -> bool:
    return static_model.is_prepared(path)


def distill_static_model(target: Path) -> Path:
    return static_model.distill(target)


def ensure_static_model(path: Path | None = None) -> Path:
    path = path or default_model_dir()
    if not model_ready(path):
        distill_static_model(path)
    return path


def load_static_embedder(path: Path | None = None) -> StaticEmbedder:
    return StaticEmbedder(ensure_static_model(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="distil again even if the model is there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.model_dir or default_model_dir()
    if args.force or not model_ready(path):
        distill_static_model(path)
    embedder = StaticEmbedder(path)
    print(f"cache embedding model ready: {path} (dim {embedder.dim}, {embedder.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
