"""Retrieval-augmented prompts: context assembly within a token budget, and citations back out of the answer.

Pure domain code (no gRPC, no I/O) for the router's request path:

1. :func:`assemble_context` takes the search hits (best first) and a token
   budget and returns the text of one system message: an instruction to answer
   from the sources and cite them, then the sources. Chunks are taken best
   first while they fit (one that does not fit is skipped, a smaller one after
   it may still fit; a chunk is never cut). They are then laid out with the
   best at the start and the next best at the end, the weakest in the middle:
   models use the start and end of a long context best ("lost in the middle",
   Liu et al. 2023).
2. Each source is labelled ``[n]`` (its position in the prompt). Models cite
   short numeric labels far more reliably than arbitrary ids, which may
   contain brackets, commas or ``#``; the label-to-chunk-id map stays here.
3. :func:`cited_chunk_ids` reads the answer's ``[n]`` / ``[n, m]`` / ``[n][m]``
   citations and returns the chunk ids they name, in order of first citation;
   labels that name no source are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from libs.tokens import estimate_tokens

CITATION_INSTRUCTION = (
    "Answer the user's question using the numbered sources below. After each sentence that uses a source, "
    "cite it by its number in square brackets, like [1] or [2][3]. Cite only the numbers listed here. "
    "If the sources do not contain the answer, say so and do not invent one."
)
_SOURCES_HEADER = "\n\nSources:"
# "[1]", "[1, 2]", "[1;2]", "[ 3 ]"; a citation group holds numbers only.
_CITATION = re.compile(r"\[\s*(\d{1,4}(?:\s*[,;]\s*\d{1,4})*)\s*\]")


@dataclass(frozen=True)
class ContextChunk:
    """A search hit as the prompt needs it."""

    chunk_id: str
    document_id: str
    text: str
    score: float = 0.0


@dataclass(frozen=True)
class RetrievedContext:
    """The system message text and which chunk each ``[n]`` label stands for.

    ``labels[n - 1]`` is the chunk id of source ``[n]``. ``text`` is empty
    when no chunk fits the budget (or there were none): the request then goes
    on without context.
    """

    text: str
    labels: tuple[str, ...]
    tokens: int
    # Hits left out because they did not fit the budget, best first.
    dropped: tuple[str, ...] = ()

    @property
    def chunk_ids(self) -> tuple[str, ...]:
        return self.labels


def _format_source(label: int, chunk: ContextChunk) -> str:
    return f"\n\n[{label}] (document {chunk.document_id})\n{chunk.text.strip()}"


def _ends_first(ranked: Sequence[ContextChunk]) -> list[ContextChunk]:
    """Best first, second best last, third second, fourth second to last, ...: the weakest end up in the middle."""
    front = list(ranked[0::2])
    back = list(ranked[1::2])
    return front + back[::-1]


def assemble_context(hits: Sequence[ContextChunk], max_tokens: int, *,
                     count_tokens: Callable[[str], int] = estimate_tokens) -> RetrievedContext:
    """The context message for ``hits`` (best first) within ``max_tokens`` (as counted by ``count_tokens``)."""
    fixed = count_tokens(CITATION_INSTRUCTION + _SOURCES_HEADER)
    seen: set[str] = set()
    chosen: list[ContextChunk] = []
    dropped: list[str] = []
    # The label's width changes a source's size by a token at most; reserve it so the total never overshoots.
    used = fixed
    for hit in hits:
        if hit.chunk_id in seen or not hit.text.strip():
            continue
        seen.add(hit.chunk_id)
        cost = count_tokens(_format_source(len(hits), hit)) + 1
        if used + cost <= max_tokens:
            chosen.append(hit)
            used += cost
        else:
            dropped.append(hit.chunk_id)
    if not chosen:
        return RetrievedContext(text="", labels=(), tokens=0, dropped=tuple(dropped))
    ordered = _ends_first(chosen)
    text = CITATION_INSTRUCTION + _SOURCES_HEADER + "".join(
        _format_source(i, chunk) for i, chunk in enumerate(ordered, start=1))
    return RetrievedContext(text=text, labels=tuple(c.chunk_id for c in ordered), tokens=count_tokens(text),
                            dropped=tuple(dropped))


def cited_chunk_ids(answer: str, context: RetrievedContext) -> list[str]:
    """Chunk ids the answer cites, in order of first citation, each once; unknown labels are ignored."""
    out: dict[str, None] = {}
    for match in _CITATION.finditer(answer):
        for number in re.split(r"\s*[,;]\s*", match.group(1)):
            n = int(number)
            if 1 <= n <= len(context.labels):
                out.setdefault(context.labels[n - 1], None)
    return list(out)
