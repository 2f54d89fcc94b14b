from __future__ import annotations

import random

import pytest

from libs.rag_context import (
    CITATION_INSTRUCTION,
    ContextChunk,
    RetrievedContext,
    assemble_context,
    cited_chunk_ids,
)
from libs.tokens import estimate_tokens


def hit(i: int, words: int = 20) -> ContextChunk:
    return ContextChunk(chunk_id=f"doc{i}#0", document_id=f"doc{i}", text=" ".join([f"fact{i}"] * words),
                        score=1.0 / (i + 1))


def test_best_chunks_at_the_start_and_the_end() -> None:
    hits = [hit(i) for i in range(6)]  # best first
    ctx = assemble_context(hits, 10_000)
    # 1st best first, 2nd best last, 3rd second, 4th second to last, ...: the weakest in the middle.
    assert ctx.labels == ("doc0#0", "doc2#0", "doc4#0", "doc5#0", "doc3#0", "doc1#0")
    assert ctx.text.startswith(CITATION_INSTRUCTION)
    positions = [ctx.text.index(f"[{n}] (document {c.split('#')[0]})") for n, c in enumerate(ctx.labels, start=1)]
    assert positions == sorted(positions)
    assert ctx.text.index("fact0") < ctx.text.index("fact2") < ctx.text.index("fact5") < ctx.text.index("fact1")
    assert ctx.dropped == ()


def test_budget_is_respected_and_whole_chunks_are_skipped_not_cut() -> None:
    hits = [hit(0, 40), hit(1, 400), hit(2, 40), hit(3, 40)]  # hit 1 is far bigger than the others
    budget = estimate_tokens(CITATION_INSTRUCTION) + 150
    ctx = assemble_context(hits, budget)
    assert ctx.tokens <= budget
    assert "doc1#0" in ctx.dropped and "doc1#0" not in ctx.labels
    assert set(ctx.labels) <= {"doc0#0", "doc2#0", "doc3#0"} and "doc0#0" in ctx.labels
    for chunk in hits:
        if chunk.chunk_id in ctx.labels:
            assert chunk.text in ctx.text  # never truncated


@pytest.mark.parametrize("seed", range(5))
def test_random_budgets_never_overflow(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(100):
        hits = [hit(i, rng.randint(1, 200)) for i in range(rng.randint(0, 12))]
        budget = rng.randint(0, 3000)
        ctx = assemble_context(hits, budget)
        assert ctx.tokens <= budget
        assert ctx.tokens == estimate_tokens(ctx.text)
        assert set(ctx.labels).isdisjoint(ctx.dropped)
        assert len(ctx.labels) + len(ctx.dropped) == len(hits)
        # The best hit is always in when it fits on its own (hits are taken best first).
        if hits and budget >= assemble_context(hits[:1], 10**6).tokens + 2:
            assert hits[0].chunk_id in ctx.labels


def test_nothing_fits_or_no_hits_means_no_context() -> None:
    assert assemble_context([], 1000) == RetrievedContext(text="", labels=(), tokens=0)
    tiny = assemble_context([hit(0)], 10)
    assert (tiny.text, tiny.labels, tiny.dropped) == ("", (), ("doc0#0",))


def test_duplicate_and_blank_hits_are_skipped() -> None:
    blank = ContextChunk("blank#0", "blank", "   ")
    ctx = assemble_context([hit(0), hit(0), blank, hit(1)], 10_000)
    assert ctx.labels == ("doc0#0", "doc1#0")


def test_custom_token_counter() -> None:
    words = assemble_context([hit(0, 10), hit(1, 10)], 70, count_tokens=lambda t: len(t.split()))
    assert words.tokens <= 70
    assert words.labels == ("doc0#0",)  # the instruction is 50 words, one source of ~14 fits


def test_cited_chunk_ids() -> None:
    ctx = assemble_context([hit(i) for i in range(4)], 10_000)  # labels: doc0, doc2, doc3, doc1
    answer = "Otters float [1]. They eat fish [3][1] and [2, 4]; see also [ 4 ] and [9], [0], [x] and a[1a]."
    assert cited_chunk_ids(answer, ctx) == ["doc0#0", "doc3#0", "doc2#0", "doc1#0"]
    assert cited_chunk_ids("No sources used.", ctx) == []
    assert cited_chunk_ids("[1]", RetrievedContext("", (), 0)) == []
    # Semicolons, spaces, and the same source cited twice.
    assert cited_chunk_ids("[2 ; 2] [2]", ctx) == ["doc2#0"]
