"""OpenAI's `POST /v1/audio/speech` body -> the worker's own `SpeechRequest`.

Only names change here; every check and limit stays in `schema.parse_request`, so the
HTTP API and the queue API accept the same things and word their errors the same way:

    input -> text      response_format -> format      instructions -> scene
    voice -> voice (OpenAI names go through the OPENAI_VOICE_MAP table; see `map_voice`)
    speed, and the Higgs extras (seed, temperature, speakers, ...) pass through as they are

Errors name the field as the caller sent it (`input`, not `text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from higgs_runpod.errors import RequestError
from higgs_runpod.request.schema import SpeechRequest, parse_request
from higgs_runpod.request.voices import list_library
from higgs_runpod.settings import Settings

OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer",
    "verse", "marin", "cedar",
)  # fmt: skip
MODEL_ID = "higgs-audio-v2"
# Model names OpenAI clients send; all of them mean this worker's one model.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
DEFAULT_RESPONSE_FORMAT = "mp3"  # OpenAI's default

# Our field name -> the OpenAI name a caller used for it (for error messages).
_OPENAI_NAMES = {"text": "input", "format": "response_format"}
_RENAMED = {"input": "text", "response_format": "format"}

StreamFormat = Literal["audio", "sse"]  # how POST /v1/audio/speech sends the audio
STREAM_FORMATS: tuple[str, ...] = get_args(StreamFormat)


@dataclass(frozen=True)
class OpenAISpeech:
    """A validated OpenAI speech request: what to generate and how to send it. `model` is
    required and any name is taken (this worker serves one model), so it is not kept."""

    request: SpeechRequest
    stream_format: StreamFormat


def map_voice(name: str, settings: Settings) -> str | None:
    """The library voice a request's `voice` name stands for; None means smart voice.

    A library voice of that exact name wins. Otherwise OpenAI's built-in names (and any
    extra names in OPENAI_VOICE_MAP) go through the table, and a mapped voice that is not
    in the library falls back to smart voice, so every OpenAI client works against an
    empty library. Any other name is passed on for the voice resolver to reject.
    """
    library = {voice.name for voice in list_library(settings.voices_path)}
    if name in library:
        return name
    key = name.lower()
    if key in OPENAI_VOICES or key in settings.openai_voice_map:
        target = settings.openai_voice_map.get(key)
        return target if target in library else None
    return name


def parse_openai_speech(raw: Any, settings: Settings) -> OpenAISpeech:
    """Validate an OpenAI speech body; raise `RequestError` naming the OpenAI field."""
    if not isinstance(raw, dict):
        raise RequestError("body", "must be a JSON object")
    body = dict(raw)
    model = body.pop("model", None)
    if not isinstance(model, str) or not model.strip():
        raise RequestError("model", f"is required (use {MODEL_ID!r}; OpenAI's names work too)")
    stream_format = body.pop("stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise RequestError("stream_format", f"must be {' or '.join(map(repr, STREAM_FORMATS))}")
    for ours, theirs in _OPENAI_NAMES.items():
        if ours in body:
            raise RequestError(ours, f"unknown field (this API calls it {theirs!r})")
    if "input" not in body:
        raise RequestError("input", "is required")

    fields = {_RENAMED.get(name, name): value for name, value in body.items()}
    fields.setdefault("format", DEFAULT_RESPONSE_FORMAT)
    instructions = fields.pop("instructions", None)
    if isinstance(instructions, str) and not instructions.strip():
        instructions = None  # some clients always send the field, empty
    if instructions is not None:
        if "scene" in fields:
            raise RequestError("instructions", "give either instructions or scene, not both")
        fields["scene"] = instructions
    voice = fields.get("voice")
    if isinstance(voice, dict) and set(voice) == {"id"}:
        voice = voice["id"]  # OpenAI's custom voice object: {"id": "name"}
    if isinstance(voice, str):
        fields["voice"] = map_voice(voice, settings)
        if fields["voice"] is None:
            del fields["voice"]
    try:
        request = parse_request(fields, settings)
    except RequestError as error:
        raise in_openai_terms(error, instructions is not None) from None
    return OpenAISpeech(request=request, stream_format=stream_format)


def in_openai_terms(error: RequestError, scene_from_instructions: bool = False) -> RequestError:
    """`error` naming the field as an OpenAI caller knows it (also for errors found later,
    while the request is planned)."""
    head, _, rest = error.field.partition(".")
    renamed = _OPENAI_NAMES.get(head, head)
    if head == "scene" and scene_from_instructions:
        renamed = "instructions"
    # The same class: a taken voice name stays a conflict (HTTP 409), and so on.
    return type(error)(f"{renamed}.{rest}" if rest else renamed, error.message)
