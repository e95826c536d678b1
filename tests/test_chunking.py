"""Splitting long texts: boundaries by method, spans into the original text."""

from __future__ import annotations

import pytest

from higgs_runpod.chunking import count_words, split_text
from higgs_runpod.schema import ChunkingOptions

ARTICLE = (
    "The first sentence is short. The second sentence has quite a few more words in it!\n\n"
    "A new paragraph starts here. " + "word " * 23
)


def texts(text: str, **options: object) -> list[str]:
    chunks = split_text(text, ChunkingOptions(**options))
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
    assert len(split_text(text, ChunkingOptions(max_words=20))) == expected


def test_none_keeps_the_text_whole() -> None:
    assert texts(ARTICLE, method="none") == [ARTICLE.strip()]
