"""Long texts split into chunks the model can say well, one voice across all of them.

Methods (upstream's meanings): `speaker` cuts at [SPEAKERn] turns, `max_turns` turns a
chunk; `word` cuts paragraphs into chunks of at most `max_words` words, at sentence ends
where it can; `none` keeps the text whole; `auto` picks `speaker` for tagged dialogue,
`word` for text longer than `max_words`, else `none`. Chinese, Japanese and Korean
characters count as one word each (they have no spaces, and a character is about a
syllable of speech). Spans index into the request's original text.

Whatever the method, no chunk is longer than `max_chars` (MAX_TEXT_CHARS) once normalised
(prompts.normalize_text, which can make a text several times longer): `none` refuses such a
text; the others cut an overlong chunk at the last space that fits, or, in a run without
spaces, hard at the limit. A dialogue turn cut so keeps its speaker: every later piece
starts with the turn's [SPEAKERn] tag (so its text is the span's text behind that tag).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from higgs_runpod.errors import RequestError
from higgs_runpod.request.prompts import normalize_text
from higgs_runpod.request.schema import SPEAKER_TAG, ChunkingOptions

_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|(?:(?![{_CJK}])[\w'\u2019])+")
_SENTENCE_END = re.compile(rf"(?<=[.!?。！？])(?:\s+|(?=[{_CJK}]))")  # noqa: RUF001
_PARAGRAPH = re.compile(r"\n\s*\n")
_SPACES = re.compile(r"\s*")


@dataclass(frozen=True)
class Chunk:
    start: int  # character span [start, end) in the original text
    end: int
    text: str


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def split_text(text: str, options: ChunkingOptions, max_chars: int) -> list[Chunk]:
    """Split `text` into chunks by `options.method`, each at most `max_chars` characters
    once normalised (see the module docstring)."""
    method = options.method
    if method == "auto":
        if SPEAKER_TAG.search(text):
            method = "speaker"
        elif count_words(text) > options.max_words:
            method = "word"
        else:
            method = "none"
    if method == "speaker":
        spans = _by_turns(text, options.max_turns)
    elif method == "word":
        spans = _by_words(text, options.max_words)
    else:
        spans = [(0, len(text))]
    chunks = [chunk for start, end in spans if (chunk := _chunk(text, start, end)).text]
    if options.method == "none":  # asked for: the text is said whole, or not at all
        length = len(normalize_text(text))
        if length > max_chars:
            raise RequestError(
                "text",
                f"is {length} characters once normalised; the limit with chunking method "
                f"none is {max_chars} (MAX_TEXT_CHARS): let the worker chunk it",
            )
        return chunks
    return [piece for chunk in chunks for piece in _fit(text, chunk, max_chars)]


def _fit(text: str, chunk: Chunk, max_chars: int) -> list[Chunk]:
    """`chunk`, cut into pieces of at most `max_chars` normalised characters."""
    if len(normalize_text(chunk.text)) <= max_chars:
        return [chunk]
    tags = list(SPEAKER_TAG.finditer(text, chunk.start, chunk.end))
    pieces, start = [], chunk.start
    while start < chunk.end:
        turn = [tag for tag in tags if tag.start() < start]
        opens_turn = SPEAKER_TAG.match(text, _spaces_end(text, start))
        prefix = turn[-1].group(0) + " " if turn and not opens_turn else ""
        end = _longest_fit(text, start, chunk.end, max_chars, prefix)
        piece = _chunk(text, start, end)
        if piece.text:
            pieces.append(Chunk(piece.start, piece.end, prefix + piece.text))
        start = end
    return pieces


def _longest_fit(text: str, start: int, end: int, max_chars: int, prefix: str) -> int:
    """Where a piece from `start` ends: as far as fits once normalised, then back to the
    last space in its second half, if there is one."""

    def fits(stop: int) -> bool:
        return len(normalize_text(prefix + text[start:stop])) <= max_chars

    if end - start <= max_chars and fits(end):
        return end
    low, high = start + 1, min(end, start + max_chars)  # low always fits (see MAX_TEXT_CHARS)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    space = max(text.rfind(" ", start, low), text.rfind("\n", start, low))
    return space + 1 if space > start + (low - start) // 2 and fits(space + 1) else low


def _chunk(text: str, start: int, end: int) -> Chunk:
    """Trim whitespace off a span, keeping the span exact."""
    piece = text[start:end]
    start += len(piece) - len(piece.lstrip())
    end -= len(piece) - len(piece.rstrip())
    return Chunk(start, max(start, end), text[start:end])


def _by_turns(text: str, max_turns: int) -> list[tuple[int, int]]:
    starts = [match.start() for match in SPEAKER_TAG.finditer(text)]
    if not starts or (starts[0] > 0 and text[: starts[0]].strip()):
        starts = [0, *starts]
    groups = starts[::max_turns]
    return list(zip(groups, [*groups[1:], len(text)], strict=True))


def _by_words(text: str, max_words: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for paragraph in _spans_between(_PARAGRAPH, text, 0, len(text)):
        sentences = _spans_between(_SENTENCE_END, text, *paragraph)
        current: tuple[int, int] | None = None
        current_words = 0
        for sentence in (piece for s in sentences for piece in _split_long(text, s, max_words)):
            words = count_words(text[sentence[0] : sentence[1]])
            if current is not None and current_words + words > max_words:
                spans.append(current)
                current = None
            if current is None:
                current, current_words = sentence, words
            else:
                current, current_words = (current[0], sentence[1]), current_words + words
        if current is not None:
            spans.append(current)
    return spans


def _spaces_end(text: str, start: int) -> int:
    """Where the run of whitespace at `start` ends."""
    match = _SPACES.match(text, start)
    assert match is not None  # `\s*` matches the empty string
    return match.end()


def _spans_between(
    separator: re.Pattern[str], text: str, start: int, end: int
) -> list[tuple[int, int]]:
    """Spans of text[start:end] between matches of `separator`."""
    spans: list[tuple[int, int]] = []
    position = start
    for match in separator.finditer(text, start, end):
        spans.append((position, match.start()))
        position = match.end()
    spans.append((position, end))
    return [span for span in spans if text[span[0] : span[1]].strip()]


def _split_long(text: str, span: tuple[int, int], max_words: int) -> list[tuple[int, int]]:
    """A sentence longer than max_words, cut into runs of max_words words."""
    words = list(_WORD.finditer(text, span[0], span[1]))
    if len(words) <= max_words:
        return [span]
    cuts = [words[i].start() for i in range(0, len(words), max_words)]
    return list(zip([span[0], *cuts[1:]], [*cuts[1:], span[1]], strict=True))


def segment_end(text: str, max_words: int) -> tuple[int, int] | None:
    """Where the first finished segment of text that is still arriving ends, as (end of the
    segment, start of the rest): after a sentence end with something after it, or after
    `max_words` words when a further word shows the last of them is whole; None if neither.
    """
    cuts = []
    if (sentence := _SENTENCE_END.search(text)) is not None:
        cuts.append((sentence.start(), sentence.end()))
    words = list(itertools.islice(_WORD.finditer(text), max_words + 1))
    if len(words) > max_words:
        cuts.append((words[max_words - 1].end(), words[max_words].start()))
    return min(cuts, default=None)
