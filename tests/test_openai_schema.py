"""OpenAI speech bodies -> SpeechRequest: renames, voice table, errors in OpenAI's terms."""

from __future__ import annotations

from pathlib import Path

import pytest

from higgs_runpod.errors import RequestError
from higgs_runpod.request.openai_schema import OPENAI_VOICES, map_voice, parse_openai_speech
from higgs_runpod.settings import Settings, load_settings


def body(**fields: object) -> dict[str, object]:
    return {"model": "tts-1", "input": "Hello there.", "voice": "alloy", **fields}


def error_of(raw: object, settings: Settings) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_openai_speech(raw, settings)
    return caught.value


def test_openai_fields_become_the_worker_request(settings: Settings) -> None:
    parsed = parse_openai_speech(
        body(response_format="flac", speed=1.5, instructions="A quiet room.", seed=7),
        settings,
    )
    request = parsed.request
    assert (request.text, request.format, request.speed) == ("Hello there.", "flac", 1.5)
    assert (request.scene, request.seed, parsed.stream_format) == ("A quiet room.", 7, "audio")


@pytest.mark.parametrize("model", ["tts-1", "higgs-audio-v2", "gpt-4o-mini-tts", "anything"])
def test_any_model_name_is_taken(model: str, settings: Settings) -> None:
    """One model serves every name; the field is still required (test_errors_name_...)."""
    assert parse_openai_speech(body(model=model), settings).request.text == "Hello there."


def test_defaults_follow_openai(settings: Settings) -> None:
    request = parse_openai_speech(body(), settings).request
    assert (request.format, request.speed, request.scene) == ("mp3", 1.0, None)


def test_empty_instructions_mean_none(settings: Settings) -> None:
    assert parse_openai_speech(body(instructions="  "), settings).request.scene is None


def test_higgs_extras_pass_through(settings: Settings) -> None:
    raw = body(
        input="[SPEAKER0] Hi. [SPEAKER1] Hello.",
        voice=None,
        speakers={"SPEAKER0": "alice", "SPEAKER1": {"description": "a deep voice"}},
        temperature=0.3,
        top_k=20,
        max_new_tokens=100,
        sample_rate=16000,
        stream_format="sse",
    )
    del raw["voice"]
    parsed = parse_openai_speech(raw, settings)
    assert parsed.stream_format == "sse"
    assert parsed.request.speakers is not None
    assert set(parsed.request.speakers) == {"SPEAKER0", "SPEAKER1"}
    assert (parsed.request.temperature, parsed.request.top_k) == (0.3, 20)
    assert (parsed.request.max_new_tokens, parsed.request.sample_rate) == (100, 16000)


@pytest.mark.parametrize("name", OPENAI_VOICES)
def test_openai_voices_without_a_library_voice_are_smart_voice(
    name: str, settings: Settings
) -> None:
    assert parse_openai_speech(body(voice=name), settings).request.voice is None


def test_voice_table_maps_to_library_voices(base_env: dict[str, str]) -> None:
    settings = load_settings({**base_env, "OPENAI_VOICE_MAP": "alloy=alice,narrator=alice"})
    assert map_voice("alloy", settings) == "alice"
    assert map_voice("ALLOY", settings) == "alice"
    assert map_voice("narrator", settings) == "alice"  # extra names work too
    assert map_voice("echo", settings) is None  # not in the table: smart voice
    assert parse_openai_speech(body(voice="alloy"), settings).request.voice == "alice"


def test_table_target_missing_from_library_is_smart_voice(base_env: dict[str, str]) -> None:
    settings = load_settings({**base_env, "OPENAI_VOICE_MAP": "alloy=nobody"})
    assert map_voice("alloy", settings) is None


def test_library_voice_named_like_an_openai_voice_wins(tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "nova.wav").write_bytes(b"RIFF")
    (tmp_path / "nova.txt").write_text("hi")
    own = settings.model_copy(update={"voices_path": tmp_path})
    assert map_voice("nova", own) == "nova"


def test_custom_voice_object_is_a_library_name(settings: Settings) -> None:
    assert parse_openai_speech(body(voice={"id": "alice"}), settings).request.voice == "alice"


def test_unknown_voice_names_reach_the_resolver(settings: Settings) -> None:
    assert parse_openai_speech(body(voice="bob"), settings).request.voice == "bob"


def test_bad_voice_map_setting_is_refused(base_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="alloy=belinda"):
        load_settings({**base_env, "OPENAI_VOICE_MAP": "alloy:belinda"})


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (body(input=""), "input", "must not be empty"),
        (body(input="x" * 100_001), "input", "the limit with chunking is 100000"),
        (body(input="x" * 2001, chunking={"method": "none"}), "input", "the limit is 2000"),
        (body(response_format="ogg"), "response_format", "'mp3'"),
        (body(speed=5), "speed", "less than or equal to 4"),
        (body(speed=0.1), "speed", "greater than or equal to 0.25"),
        (body(stream_format="chunks"), "stream_format", "'audio' or 'sse'"),
        (body(instructions=7), "instructions", "valid string"),
        (body(instructions="a", scene="b"), "instructions", "not both"),
        (body(text="hi"), "text", "'input'"),
        (body(format="wav"), "format", "'response_format'"),
        (body(colour="red"), "colour", "unknown field"),
        (body(seed=-1), "seed", "greater than or equal to 0"),
        ({"input": "hi", "voice": "alloy"}, "model", "is required"),
        ({"model": "tts-1", "voice": "alloy"}, "input", "is required"),
        ([1, 2], "body", "JSON object"),
    ],
)
def test_errors_name_the_openai_field(
    raw: object, field: str, words: str, settings: Settings
) -> None:
    error = error_of(raw, settings)
    assert error.field == field
    assert words in error.message
