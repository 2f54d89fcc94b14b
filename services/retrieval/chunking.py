"""Split documents into overlapping windows of "tokens".

For now a token is a whitespace-separated word (``\\S+``): cheap, language
agnostic and good enough for the lexical embedder. When a model-backed embedder
lands, its tokenizer can replace :func:`tokenize` without changing callers.
Chunk text is the original text between the first and last token of the
window, so line breaks and spacing inside a chunk are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"\S+")


@dataclass(frozen=True)
class ChunkingOptions:
    """Window size and overlap, both in tokens; ``0 <= overlap_tokens < chunk_tokens``."""

    chunk_tokens: int
    overlap_tokens: int

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        if not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError("overlap_tokens must be in [0, chunk_tokens)")

    @property
    def stride(self) -> int:
        return self.chunk_tokens - self.overlap_tokens


@dataclass(frozen=True)
class Chunk:
    """One window: its position in the document, its text and its token range ``[start_token, end_token)``."""

    index: int
    text: str
    start_token: int
    end_token: int


def tokenize(text: str) -> list[tuple[int, int]]:
    """Character spans of the tokens of ``text``."""
    return [m.span() for m in _TOKEN.finditer(text)]


def chunk_text(text: str, options: ChunkingOptions) -> list[Chunk]:
    """Windows of ``chunk_tokens`` tokens, each starting ``stride`` tokens after the previous, in order.

    The last window ends at the last token; no window is a suffix of the one
    before it. Text without tokens (empty or whitespace only) has no chunks.
    """
    spans = tokenize(text)
    n = len(spans)
    chunks: list[Chunk] = []
    start = 0
    while start < n:
        end = min(start + options.chunk_tokens, n)
        chunks.append(Chunk(index=len(chunks), text=text[spans[start][0]:spans[end - 1][1]],
                            start_token=start, end_token=end))
        if end == n:
            break
        start += options.stride
    return chunks
