"""Split documents into overlapping windows measured in the embedder's tokens.

A window never splits a word: the text is cut into whitespace-separated words
(``\\S+``), each word costs as many tokens as the embedder's tokenizer makes of
it (see :class:`TokenCounter`; without one, a word is one token), and whole
words are packed into windows of at most ``chunk_tokens`` tokens. Each window
after the first starts with the trailing words of the one before that total at
most ``overlap_tokens`` tokens (always at least one word further on, so a word
longer than a window still makes progress). With one token per word this is
exactly a stride of ``chunk_tokens - overlap_tokens`` words.

Chunk text is the original text between the first and last word of the
window, so line breaks and spacing inside a chunk are kept.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Protocol

_TOKEN = re.compile(r"\S+")


class TokenCounter(Protocol):
    """How many model tokens each word of ``text`` is (one count per span, in order)."""

    def __call__(self, text: str, spans: list[tuple[int, int]]) -> list[int]: ...


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
    """One window: its position in the document, its text and its word range ``[start_token, end_token)``.

    ``start_token``/``end_token`` index words (whitespace tokens); ``tokens`` is the
    window's size in model tokens.
    """

    index: int
    text: str
    start_token: int
    end_token: int
    tokens: int = 0


def tokenize(text: str) -> list[tuple[int, int]]:
    """Character spans of the words of ``text``."""
    return [m.span() for m in _TOKEN.finditer(text)]


def offsets_to_word_counts(spans: list[tuple[int, int]], token_starts: list[int]) -> list[int]:
    """Tokens per word, given each model token's start offset (tokens between words count for the word before)."""
    counts = [0] * len(spans)
    if not spans:
        return counts
    word_starts = [s for s, _ in spans]
    for start in token_starts:
        counts[max(0, bisect.bisect_right(word_starts, start) - 1)] += 1
    # Every word costs at least one token, even one the tokenizer dropped (control characters).
    return [max(1, c) for c in counts]


def chunk_text(text: str, options: ChunkingOptions, count_tokens: TokenCounter | None = None) -> list[Chunk]:
    """Windows of at most ``chunk_tokens`` tokens (or one over-long word), in order.

    The last window ends at the last word; no window is a suffix of the one
    before it. Text without words (empty or whitespace only) has no chunks.
    """
    spans = tokenize(text)
    n = len(spans)
    if n == 0:
        return []
    costs = count_tokens(text, spans) if count_tokens is not None else [1] * n
    if len(costs) != n:
        raise ValueError("token counter returned a count per word")
    chunks: list[Chunk] = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and (end == start or used + costs[end] <= options.chunk_tokens):
            used += costs[end]
            end += 1
        chunks.append(Chunk(index=len(chunks), text=text[spans[start][0]:spans[end - 1][1]],
                            start_token=start, end_token=end, tokens=used))
        if end == n:
            return chunks
        # The next window starts with the longest tail of this one within the overlap budget.
        next_start, tail = end, 0
        while next_start - 1 > start and tail + costs[next_start - 1] <= options.overlap_tokens:
            next_start -= 1
            tail += costs[next_start]
        start = next_start
