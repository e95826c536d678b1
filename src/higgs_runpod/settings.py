"""Worker settings, read from environment variables (one class, built in a function).

Nothing reads the environment at import time: `load_settings()` builds a `Settings`
from `os.environ` (or from a mapping, in tests) and the worker passes it around.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

VOLUME = Path("/runpod-volume")


def _default_voices_path() -> Path:
    return VOLUME / "voices" if VOLUME.is_dir() else Path("voices")


class Settings(BaseSettings):
    """Every knob of the worker; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    model_path: Path = Field(
        default=VOLUME / "bosonai" / "higgs-audio-v2-generation-3B-base",
        description="Directory of the generation model (transformers format).",
    )
    tokenizer_path: Path = Field(
        default=VOLUME / "bosonai" / "higgs-audio-v2-tokenizer",
        description="Directory of the audio tokenizer (transformers format).",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    lazy_load: bool = Field(
        default=False, description="Load the model on the first request instead of at start."
    )
    voices_path: Path = Field(default_factory=_default_voices_path)
    max_text_chars: int = Field(default=2000, ge=1)
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_ref_audio_bytes: int = Field(default=10_000_000, ge=1)
    max_ref_audio_seconds: float = Field(default=30.0, gt=0)
    audio_url_timeout_s: float = Field(default=15.0, gt=0)
    allow_http_audio_urls: bool = Field(default=False, description="Allow plain http:// URLs.")
    allow_private_audio_urls: bool = Field(
        default=False, description="Allow URLs that resolve to private or loopback addresses."
    )

    worker_mode: Literal["queue", "http"] = Field(
        default="queue",
        description="What `higgs-runpod start` runs: RunPod's job queue or the HTTP server.",
    )
    http_host: str = Field(default="0.0.0.0", description="Address the HTTP server binds.")
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        description="HTTP server port (RunPod sets PORT).",
    )
    higgs_api_key: SecretStr | None = Field(
        default=None, description="When set, HTTP routes but /ping and / need this Bearer key."
    )
    openai_voice_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_OPENAI_VOICE_MAP),
        description="OpenAI voice name -> library voice, as `alloy=belinda,echo=en_man`.",
    )
    http_max_in_flight: int = Field(
        default=8, ge=1, description="Speech requests admitted at once; more get HTTP 429."
    )
    http_max_body_bytes: int = Field(
        default=20_000_000, ge=1024, description="Largest HTTP request body (HTTP 413 above)."
    )
    http_stream_chunk_bytes: int = Field(
        default=32_768, ge=1024, description="Size of the pieces a streamed response is sent in."
    )

    @field_validator("openai_voice_map", mode="before")
    @classmethod
    def _parse_voice_map(cls, value: object) -> object:
        """`alloy=belinda,echo=en_man` (an env var) or a mapping; names are case-insensitive."""
        if isinstance(value, str):
            pairs = [item.strip() for item in value.split(",") if item.strip()]
            if any(pair.count("=") != 1 for pair in pairs):
                raise ValueError("must look like alloy=belinda,echo=en_man")
            value = dict(pair.split("=") for pair in pairs)
        if isinstance(value, dict):
            return {str(k).strip().lower(): str(v).strip() for k, v in value.items()}
        return value


# OpenAI's built-in voice names -> upstream Higgs Audio preset names (examples/voice_prompts),
# by the gender of OpenAI's voice. Used only when the library holds that preset; otherwise
# the model picks the voice (smart voice).
DEFAULT_OPENAI_VOICE_MAP = {
    "alloy": "en_woman",
    "ash": "en_man",
    "ballad": "chadwick",
    "coral": "belinda",
    "echo": "en_man",
    "fable": "chadwick",
    "nova": "en_woman",
    "onyx": "chadwick",
    "sage": "mabel",
    "shimmer": "belinda",
    "verse": "en_man",
    "marin": "mabel",
    "cedar": "en_man",
}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    fields = {name: env[name.upper()] for name in Settings.model_fields if name.upper() in env}
    return Settings.model_validate(fields)
