"""Splitting long texts: boundaries by method, spans into the original text."""

from __future__ import annotations

import random

import pytest

from higgs_runpod.errors import RequestError
from higgs_runpod.request.chunking import count_words, split_text
from higgs_runpod.request.prompts import normalize_text
from higgs_runpod.request.schema import ChunkingOptions

ARTICLE = (
    "The first sentence is short. The second sentence has quite a few more words in it!\n\n"
    "A new paragraph starts here. " + "word " * 23
)


def texts(text: str, **options: object) -> list[str]:
    chunks = split_text(text, ChunkingOptions(**options), 2000)
    for chunk in chunks:  # every span points at exactly its text
        assert text[chunk.start : chunk.end] == chunk.text
    return [chunk.text for chunk in chunks]


def test_word_chunks_end_at_sentences_and_paragraphs() -> None:
    assert texts(ARTICLE, method="word", max_words=12) == [
        "The first sentence is short.",
        "The second sentence has quite a few more words in it!",
        "A new paragraph starts here.",
        "word " * 11 + "word",
        "word " * 10 + "word",
    ]


def test_word_chunks_join_sentences_up_to_the_limit() -> None:
    assert texts("One two. Three four. Five six seven.", method="word", max_words=10) == [
        "One two. Three four. Five six seven."
    ]


def test_chinese_counts_characters() -> None:
    text = "你好，世界。今天天气很好！我们去公园散步吧。"  # noqa: RUF001
    assert count_words("你好，世界。") == 4  # noqa: RUF001
    assert texts(text, method="word", max_words=10) == [
        "你好，世界。今天天气很好！",  # noqa: RUF001
        "我们去公园散步吧。",
    ]


def test_speaker_chunks_by_turns() -> None:
    dialogue = "[SPEAKER0] Hi there. [SPEAKER1] Hello! [SPEAKER0] How are you? [SPEAKER1] Fine."
    assert texts(dialogue, method="speaker") == [
        "[SPEAKER0] Hi there.", "[SPEAKER1] Hello!", "[SPEAKER0] How are you?", "[SPEAKER1] Fine.",
    ]  # fmt: skip
    assert texts(dialogue, method="speaker", max_turns=3) == [
        "[SPEAKER0] Hi there. [SPEAKER1] Hello! [SPEAKER0] How are you?", "[SPEAKER1] Fine.",
    ]  # fmt: skip
    assert texts("Intro. [SPEAKER0] Hi.", method="speaker") == ["Intro.", "[SPEAKER0] Hi."]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Short text.", 1),
        ("[SPEAKER0] A. [SPEAKER1] B.", 2),
        (ARTICLE, 4),
    ],
)
def test_auto_picks_a_method(text: str, expected: int) -> None:
    assert len(split_text(text, ChunkingOptions(max_words=20), 2000)) == expected


def test_none_keeps_the_text_whole() -> None:
    assert texts(ARTICLE, method="none") == [ARTICLE.strip()]


LIMIT = 200


def bounded(text: str, **options: object) -> list[str]:
    """Chunks of `text` under a small MAX_TEXT_CHARS: each fits once normalised."""
    chunks = split_text(text, ChunkingOptions(**options), LIMIT)
    for chunk in chunks:
        assert len(normalize_text(chunk.text)) <= LIMIT
        assert text[chunk.start : chunk.end] in chunk.text  # a repeated turn tag at most
    return [chunk.text for chunk in chunks]


@pytest.mark.parametrize("method", ["auto", "word", "speaker"])
def test_a_run_without_spaces_is_cut_at_the_limit(method: str) -> None:
    pieces = bounded("x" * 100_000, method=method)
    assert len(pieces) == 100_000 // (LIMIT - 1) + 1  # normalising adds a full stop
    assert "".join(pieces) == "x" * 100_000


def test_emoji_are_cut_at_the_limit() -> None:
    pieces = bounded("\U0001f600" * 10_000)
    assert len(pieces) > 10_000 // LIMIT


def test_a_text_that_normalising_expands_is_cut_by_its_normalised_length() -> None:
    text = "°F " * 60  # 180 characters, 60 x " degrees Fahrenheit" once normalised
    pieces = bounded(text)
    assert len(pieces) >= 6
    assert all(piece.endswith("°F") for piece in pieces)  # cut at spaces, not inside


def test_a_long_turn_keeps_its_speaker_in_every_piece() -> None:
    text = "[SPEAKER0] Hi. [SPEAKER1] " + "word " * 200
    pieces = bounded(text, method="speaker")
    assert pieces[0] == "[SPEAKER0] Hi."
    assert len(pieces) > 3
    assert all(piece.startswith("[SPEAKER1] word") for piece in pieces[1:])


def test_method_none_refuses_a_text_too_long_once_normalised() -> None:
    with pytest.raises(RequestError) as caught:
        split_text("°F" * 20, ChunkingOptions(method="none"), 100)
    assert caught.value.field == "text"
    assert "is 380 characters once normalised" in caught.value.message
    assert "100 (MAX_TEXT_CHARS)" in caught.value.message


@pytest.mark.parametrize("method", ["auto", "word", "speaker"])
def test_no_chunk_of_a_hostile_text_is_over_the_limit(method: str) -> None:
    """Random mixes of what normalising expands, collapses or adds, and speaker tags."""
    pieces = ["°F", "[laugh]", "[music start]", "(", ")", " ", "  ", "\n\n", "x", "word ",
              "\U0001f600", "。", "[SPEAKER1] ", "[SPEAKER0]", "Done. "]  # fmt: skip
    generator = random.Random(12)
    for _ in range(30):
        bounded("".join(generator.choices(pieces, k=generator.randrange(50, 600))), method=method)
