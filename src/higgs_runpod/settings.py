"""Worker settings, read from environment variables (one class, built in a function).

Nothing reads the environment at import time: `load_settings()` builds a `Settings`
from `os.environ` (or from a mapping, in tests) and the worker passes it around.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    ready_file: Path = Field(
        default=Path("/tmp/higgs-runpod/ready.json"),
        description="Written by the worker once its model is loaded; read by the health check.",
    )
    runpod_api_key: SecretStr | None = Field(
        default=None, description="RunPod API key, used only by `higgs-runpod deploy`."
    )
    runpod_api_url: str = Field(
        default="https://api.runpod.io",
        description="RunPod REST API (v2) base URL, used only by `higgs-runpod deploy`.",
    )


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    fields = {name: env[name.upper()] for name in Settings.model_fields if name.upper() in env}
    return Settings.model_validate(fields)
