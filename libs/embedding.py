"""The one text-embedder contract of the mesh: :class:`Embedder`, and the row normalisation embedders share.

An embedder maps texts to L2-normalised float32 vectors of a fixed dimension and
names the vector space it writes in, so vectors of two spaces are never compared
(a store keys its vectors by that name: the cache hashes it into every entry's
context, retrieval names its dense vector after it).

Services extend the protocol with what only they need (the cache's word-level
``analyze``, retrieval's ``count_tokens`` for chunking) and every embedder they
build satisfies this protocol as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors of a fixed dimension."""

    @property
    def name(self) -> str:
        """Identifies the vector space (model and dimension): vectors of different names never mix."""
        ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> F32:
        """One row per text, shape ``(len(texts), dim)``, each row of unit L2 norm (zero only when nothing
        in the text is known to the model, e.g. empty text)."""
        ...


def unit_rows(vectors: npt.NDArray[Any]) -> F32:
    """``vectors`` as float32 rows of unit L2 norm (a 1-d input becomes one row); all-zero rows stay zero.

    Always a new array: the input is never modified.
    """
    out = np.array(vectors, dtype=np.float32, copy=True)
    if out.ndim == 1:
        out = out.reshape(1, -1)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0.0)
    return out
