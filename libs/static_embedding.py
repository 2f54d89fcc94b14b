"""Loading the static (model2vec) embedding model offline, shared by the cache and the router.

The folder is the one :mod:`libs.static_model` distills (``model.safetensors`` +
``tokenizer.json`` + ``config.json``, as model2vec's ``save_pretrained`` writes them).
Only ``tokenizers`` and ``safetensors`` are needed (no torch, no model2vec, no network).
A sentence vector is the mean of the table rows of its word pieces (unknown pieces skipped),
unit length when the model's config says ``normalize``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Encoding, Tokenizer

F32 = npt.NDArray[np.float32]

# Word pieces past this are ignored (model2vec truncates at 512 too).
MAX_PIECES = 512
REQUIRED_FILES = ("model.safetensors", "tokenizer.json", "config.json")


class StaticModelMissing(FileNotFoundError):
    """The model folder or one of its files is not there (``make setup`` distills it)."""


class StaticVectors:
    """The word-piece table and tokenizer of a static model, read from ``path``."""

    def __init__(self, path: Path):
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise StaticModelMissing(f"static embedding model not found at {path} (missing {', '.join(missing)}); "
                                     "run `make setup` or `python -m libs.static_model --out DIR`")
        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # Padding/truncation settings saved with the tokenizer would change the vectors.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        table = load_file(str(path / "model.safetensors"))["embeddings"].astype(np.float32)
        self.table: F32 = table
        config = json.loads((path / "config.json").read_text())
        self.normalize = bool(config.get("normalize", True))
        unk = self.tokenizer.token_to_id("[UNK]")
        self.unk = -1 if unk is None else unk
        digest = hashlib.sha256(table[: min(len(table), 4096)].round(3).tobytes()).hexdigest()[:16]
        self.fingerprint = f"m2v-{table.shape[1]}-{digest}"

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def encode(self, text: str) -> Encoding:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def mean_vector(self, ids: npt.NDArray[np.int64]) -> F32:
        """The sentence vector of these piece ids (already cut to ``MAX_PIECES``)."""
        known = ids[ids != self.unk]
        if len(known) == 0:
            return np.zeros(self.dim, dtype=np.float32)
        vec = self.table[known].mean(axis=0)
        norm = float(np.linalg.norm(vec))
        out: F32 = (vec / norm if norm > 0 and self.normalize else vec).astype(np.float32)
        return out

    def embed(self, text: str) -> F32:
        """The sentence vector of ``text`` (all zeros when no piece is known)."""
        ids = np.asarray(self.encode(text).ids[:MAX_PIECES], dtype=np.int64)
        return self.mean_vector(ids)
