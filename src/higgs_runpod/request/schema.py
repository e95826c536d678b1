"""The job request (`input` of a RunPod job) and its validation.

Validation is pure and happens before any model work: `parse_request` turns the raw
`input` mapping into a `SpeechRequest` or raises `RequestError` naming the field and the
limit. Limits that depend on the deployment (text length, max_new_tokens) come from the
settings through the validation context.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from higgs_runpod.errors import RequestError
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.tempo import MAX_SPEED, MIN_SPEED

AudioFormat = Literal["wav", "flac", "mp3", "opus", "aac", "pcm"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = get_args(AudioFormat)  # the one list of formats
RAS_WINDOW = 64  # the longest ras_win_len a request may ask for (the sampler keeps as many)
MAX_TRANSCRIPT_CHARS = 2000  # a reference clip's transcript
MAX_NOTE_CHARS = 500  # a voice's description, a library voice's consent
MAX_URL_CHARS = 2048  # an audio_url
SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_SAMPLE_RATES = (8000, 16000, 24000, 48000)
# At most three digits: a tag is a small number, and "[SPEAKER<5000 digits>]" stays text.
SPEAKER_TAG = re.compile(r"\[(SPEAKER[0-9]{1,3})\]")
NonEmpty = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CloneFromBase64(_Strict):
    """Clone the voice of a clip sent inline."""

    audio_base64: NonEmpty
    transcript: NonEmpty = Field(max_length=MAX_TRANSCRIPT_CHARS)


class CloneFromUrl(_Strict):
    """Clone the voice of a clip the worker downloads."""

    audio_url: NonEmpty = Field(max_length=MAX_URL_CHARS)
    transcript: NonEmpty = Field(max_length=MAX_TRANSCRIPT_CHARS)


class DescribedVoice(_Strict):
    """A voice described in words ("a calm, deep male voice with a British accent")."""

    description: NonEmpty = Field(max_length=MAX_NOTE_CHARS)


_PRESET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_SPEAKER_NAME = re.compile(r"^SPEAKER[0-9]{1,3}$")


def _check_preset_name(name: str) -> str:
    if not _PRESET_NAME.match(name):
        raise ValueError("must be a voice name: letters, digits, '_', '-', '.', at most 64")
    return name


def _check_speaker_name(name: str) -> str:
    if not _SPEAKER_NAME.match(name):
        shown = name if len(name) <= 20 else name[:20] + "..."
        raise ValueError(f"speaker {shown!r} must be named SPEAKER0, SPEAKER1, ... SPEAKER999")
    return name


PresetName = Annotated[str, AfterValidator(_check_preset_name)]
SpeakerName = Annotated[str, AfterValidator(_check_speaker_name)]


_VOICE_TAGS = {"audio_base64": "clone-base64", "audio_url": "clone-url", "description": "described"}


def _voice_kind(value: Any) -> str | None:
    """Pick the voice variant from its shape, so errors speak of that variant only."""
    if isinstance(value, str):
        return "preset-name"
    if isinstance(value, dict):
        for key, tag in _VOICE_TAGS.items():
            if key in value:
                return tag
    return None


Voice = Annotated[
    Annotated[PresetName, Tag("preset-name")]
    | Annotated[CloneFromBase64, Tag("clone-base64")]
    | Annotated[CloneFromUrl, Tag("clone-url")]
    | Annotated[DescribedVoice, Tag("described")],
    Discriminator(
        _voice_kind,
        custom_error_type="voice",
        custom_error_message="must be a preset name or an object with audio_base64, "
        "audio_url or description",
    ),
]


class ChunkingOptions(_Strict):
    """How a long text is split (see chunking.py)."""

    method: Literal["auto", "none", "speaker", "word"] = "auto"
    max_words: int = Field(default=100, ge=10, le=1000)
    max_turns: int = Field(default=1, ge=1, le=50)
    context_chunks: int = Field(default=2, ge=0, le=16)


class SaveVoice(_Strict):
    """Keep the take as a library voice (library/store.py); the name is checked there
    (store.check_name), the length here only bounds what is read."""

    name: str = Field(max_length=64)
    overwrite: bool = False
    description: NonEmpty | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    consent: NonEmpty | None = Field(default=None, max_length=MAX_NOTE_CHARS)


class VoiceFields(_Strict):
    """A new library voice, from the queue API's `voice.create` or an HTTP create."""

    name: str = Field(max_length=64)
    transcript: NonEmpty | None = Field(default=None, max_length=MAX_TRANSCRIPT_CHARS)
    description: NonEmpty | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    consent: NonEmpty | None = Field(default=None, max_length=MAX_NOTE_CHARS)
    overwrite: bool = False
    audio_base64: NonEmpty | None = None
    audio_url: NonEmpty | None = Field(default=None, max_length=MAX_URL_CHARS)
    take_id: str | None = Field(default=None, max_length=64)  # checked by library/takes.py


class SpeechRequest(_Strict):
    """One text-to-speech job. Defaults follow upstream Higgs Audio v2 serving."""

    text: NonEmpty
    voice: Voice | None = None
    speakers: dict[SpeakerName, Voice] | None = None
    scene: NonEmpty | None = Field(default=None, max_length=2000)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=50, ge=0, le=1024)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    max_new_tokens: int = Field(default=2048, ge=1)
    ras_win_len: int = Field(default=7, ge=0, le=RAS_WINDOW)
    ras_win_max_num_repeat: int = Field(default=2, ge=1, le=64)
    speed: float = Field(default=1.0, ge=MIN_SPEED, le=MAX_SPEED)
    format: AudioFormat = "wav"
    sample_rate: int = 24_000
    chunking: ChunkingOptions = ChunkingOptions()
    stream: bool = False
    output: Literal["inline", "s3"] | None = None  # None: s3 when a bucket is configured
    save_voice: SaveVoice | None = None
    remember_take: bool = False  # keep the take for a voice create's take_id (library/takes.py)

    @field_validator("temperature", "top_p", "speed", mode="before")
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        # strict mode refuses 1 for a float field; JSON callers mean 1.0.
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("speakers", mode="before")
    @classmethod
    def _speakers_limit(cls, value: Any, info: ValidationInfo) -> Any:
        # Before the entries are validated: 20,000 entries are refused, not each checked.
        limit = _settings(info).max_speakers
        if isinstance(value, dict) and len(value) > limit:
            raise RequestError(
                "speakers", f"has {len(value)} entries; the limit is {limit} (MAX_SPEAKERS)"
            )
        return value

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens_limit(cls, value: int, info: ValidationInfo) -> int:
        limit = _settings(info).max_new_tokens_limit
        if value > limit:
            raise ValueError(f"must be at most {limit}")
        return value

    @field_validator("sample_rate")
    @classmethod
    def _known_sample_rate(cls, value: int) -> int:
        if value not in SAMPLE_RATES:
            raise ValueError(f"must be one of {', '.join(map(str, SAMPLE_RATES))}")
        return value

    @model_validator(mode="after")
    def _text_limit(self, info: ValidationInfo) -> SpeechRequest:
        settings = _settings(info)
        if self.chunking.method == "none":
            limit, why = settings.max_text_chars, ""
        else:
            limit, why = settings.max_long_text_chars, " with chunking"
        if len(self.text) > limit:
            raise RequestError(
                "text", f"is {len(self.text)} characters long; the limit{why} is {limit}"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> SpeechRequest:
        if self.format == "opus" and self.sample_rate not in OPUS_SAMPLE_RATES:
            rates = ", ".join(map(str, OPUS_SAMPLE_RATES))
            raise RequestError("sample_rate", f"opus supports {rates}, not {self.sample_rate}")
        tags = self.speaker_tags
        limit = _settings(info).max_speakers
        if len(tags) > limit:
            raise RequestError(
                "text", f"uses {len(tags)} speaker tags; the limit is {limit} (MAX_SPEAKERS)"
            )
        if self.speakers is not None:
            if self.voice is not None:
                raise RequestError("voice", "give either voice or speakers, not both")
            if not self.speakers:
                raise RequestError("speakers", "must name at least one speaker")
            missing = [tag for tag in tags if tag not in self.speakers]
            if missing:
                raise RequestError(
                    "speakers", f"text uses [{missing[0]}] but speakers has no {missing[0]}"
                )
            unused = sorted(set(self.speakers) - set(tags))
            if unused:
                raise RequestError(
                    "speakers",
                    f"has {unused[0]}, but the text has no [{unused[0]}] tag; give exactly "
                    "the speakers the text uses",
                )
        return self

    @property
    def keeping(self) -> str | None:
        """The field that asks for this take to be kept (save_voice, else remember_take),
        which names the refusal of a take that could not be; None when none does."""
        if self.save_voice is not None:
            return "save_voice"
        return "remember_take" if self.remember_take else None

    @property
    def speaker_tags(self) -> list[str]:
        """The distinct [SPEAKERn] tags of the text, in order of first use."""
        return list(dict.fromkeys(SPEAKER_TAG.findall(self.text)))


def _settings(info: ValidationInfo) -> Settings:
    return (info.context or {})["settings"]


def parse_request(raw: Any, settings: Settings) -> SpeechRequest:
    """Validate a job's `input`; raise `RequestError` with the first problem found."""
    if not isinstance(raw, dict):
        raise RequestError("input", "must be a JSON object")
    try:
        return SpeechRequest.model_validate(raw, context={"settings": settings})
    except RequestError:
        raise
    except ValidationError as error:
        raise _as_request_error(error) from None


def parse_voice_fields(raw: Any) -> VoiceFields:
    """Validate a voice create's fields (JSON, a form's text fields, or a queue job)."""
    if not isinstance(raw, dict):
        raise RequestError("input", "must be a JSON object")
    try:
        return VoiceFields.model_validate(raw)
    except ValidationError as error:
        raise _as_request_error(error) from None


def _as_request_error(error: ValidationError) -> RequestError:
    first = error.errors(include_url=False)[0]
    # For unions (voice), point at the most specific branch that failed.
    loc = [str(part) for part in first["loc"] if not _is_union_branch(part)]
    field = ".".join(loc) or "input"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "is required"
    elif first["type"].startswith("string_too_short"):
        message = "must not be empty"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    else:
        message = message[0].lower() + message[1:]
    return RequestError(field, message)


def _is_union_branch(part: Any) -> bool:
    return part in {"preset-name", *_VOICE_TAGS.values(), "[key]"}
