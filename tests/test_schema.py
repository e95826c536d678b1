"""Request validation: every rejection names the field and the limit."""

from __future__ import annotations

import pytest

from higgs_runpod.errors import RequestError
from higgs_runpod.request.schema import CloneFromUrl, DescribedVoice, parse_request
from higgs_runpod.settings import Settings, load_settings


@pytest.fixture(scope="module")
def small_limits() -> Settings:
    return load_settings(
        {
            "MAX_TEXT_CHARS": "50",
            "MAX_LONG_TEXT_CHARS": "80",
            "MAX_NEW_TOKENS_LIMIT": "100",
            "MAX_SPEAKERS": "3",
        }
    )


def test_defaults_follow_upstream_serving(small_limits: Settings) -> None:
    request = parse_request({"text": "Hello"}, small_limits)
    assert (request.temperature, request.top_p, request.top_k) == (0.7, 0.95, 50)
    assert (request.ras_win_len, request.ras_win_max_num_repeat) == (7, 2)
    assert (request.format, request.sample_rate, request.voice) == ("wav", 24000, None)


def test_voice_variants_are_recognised(small_limits: Settings) -> None:
    url = parse_request(
        {"text": "a", "voice": {"audio_url": "https://x.test/a.wav", "transcript": "t"}},
        small_limits,
    )
    described = parse_request({"text": "a", "voice": {"description": "deep"}}, small_limits)
    assert isinstance(url.voice, CloneFromUrl)
    assert isinstance(described.voice, DescribedVoice)
    assert parse_request({"text": "a", "voice": "alice"}, small_limits).voice == "alice"


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({}, "text", "is required"),
        ({"text": "   "}, "text", "must not be empty"),
        ({"text": "x" * 51, "chunking": {"method": "none"}}, "text", "the limit is 50"),
        ({"text": "x" * 81}, "text", "the limit with chunking is 80"),
        ({"text": "a", "chunking": {"method": "sentence"}}, "chunking.method", "'auto'"),
        ({"text": "a", "chunking": {"max_words": 5}}, "chunking.max_words", "greater than or equal to 10"),
        ({"text": "a", "stream": True, "speed": 5.0}, "speed", "less than or equal to 4"),
        ({"text": "a", "colour": "red"}, "colour", "unknown field"),
        ({"text": 5}, "text", "valid string"),
        ({"text": "a", "seed": "7"}, "seed", "valid integer"),
        ({"text": "a", "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"text": "a", "top_p": 0}, "top_p", "greater than 0"),
        ({"text": "a", "top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"text": "a", "max_new_tokens": 101}, "max_new_tokens", "at most 100"),
        ({"text": "a", "ras_win_len": 65}, "ras_win_len", "less than or equal to 64"),
        ({"text": "a", "format": "ogg"}, "format", "'wav'"),
        ({"text": "a", "sample_rate": 12345}, "sample_rate", "must be one of"),
        ({"text": "a", "format": "opus", "sample_rate": 44100}, "sample_rate", "opus supports"),
        ({"text": "a", "voice": "../etc/passwd"}, "voice", "must be a voice name"),
        ({"text": "a", "voice": {"audio_base64": "AAAA"}}, "voice.transcript", "is required"),
        ({"text": "a", "voice": {"colour": "red"}}, "voice", "preset name or an object"),
        ({"text": "a", "voice": 3}, "voice", "preset name or an object"),
        ({"text": "[SPEAKER0] a [SPEAKER1] b", "speakers": {"SPEAKER0": "alice"}},
         "speakers", "no SPEAKER1"),
        ({"text": "a", "speakers": {"BOB": "alice"}}, "speakers.BOB", "SPEAKER0, SPEAKER1"),
        ({"text": "a", "voice": "alice", "speakers": {"SPEAKER0": "alice"}}, "voice", "not both"),
        ({"text": "[SPEAKER0] a", "speakers": {"SPEAKER0": "alice", "SPEAKER1": "alice"}},
         "speakers", "has SPEAKER1, but the text has no [SPEAKER1] tag"),
        ({"text": "a", "speakers": {"SPEAKER0": "alice"}}, "speakers", "no [SPEAKER0] tag"),
        ({"text": "[SPEAKER0] a", "speakers": {f"SPEAKER{n}": "alice" for n in range(20_000)}},
         "speakers", "has 20000 entries; the limit is 3 (MAX_SPEAKERS)"),
        ({"text": " ".join(f"[SPEAKER{n}] a" for n in range(4))},
         "text", "uses 4 speaker tags; the limit is 3 (MAX_SPEAKERS)"),
        ({"text": "a", "speakers": {"SPEAKER" + "9" * 40: "alice"}}, "speakers.SPEAKER" + "9" * 40,
         "'SPEAKER9999999999999...' must be named"),
    ],
)  # fmt: skip
def test_bad_input_names_field_and_limit(
    small_limits: Settings, raw: dict, field: str, fragment: str
) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(raw, small_limits)
    assert caught.value.field == field
    assert fragment in caught.value.message


def test_input_must_be_an_object(small_limits: Settings) -> None:
    with pytest.raises(RequestError, match="input: must be a JSON object"):
        parse_request(["text"], small_limits)


def test_speaker_tags_in_order_of_first_use(small_limits: Settings) -> None:
    request = parse_request({"text": "[SPEAKER1] hi [SPEAKER0] yo [SPEAKER1] ok"}, small_limits)
    assert request.speaker_tags == ["SPEAKER1", "SPEAKER0"]


def test_a_huge_speaker_number_is_plain_text(small_limits: Settings) -> None:
    """Tags have at most three digits, so `int()` never meets Python's digit limit."""
    request = parse_request({"text": "[SPEAKER" + "9" * 5000 + "]"}, load_settings({}))
    assert request.speaker_tags == []
    assert parse_request({"text": "[SPEAKER999] a"}, small_limits).speaker_tags == ["SPEAKER999"]
