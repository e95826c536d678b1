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
    max_text_chars: int = Field(default=2000, ge=1, description="Longest text said in one go.")
    max_long_text_chars: int = Field(
        default=100_000, ge=1, description="Longest text when chunking is on (the default)."
    )
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_ref_audio_bytes: int = Field(default=10_000_000, ge=1)
    max_ref_audio_seconds: float = Field(default=30.0, gt=0)
    audio_url_timeout_s: float = Field(default=15.0, gt=0)
    allow_http_audio_urls: bool = Field(default=False, description="Allow plain http:// URLs.")
    allow_private_audio_urls: bool = Field(
        default=False, description="Allow URLs that resolve to private or loopback addresses."
    )
    enable_streaming: bool = Field(
        default=False,
        description="Start the streaming handler (a generator): `stream: true` jobs stream "
        "through /stream, and every job's output becomes a list.",
    )
    stream_first_frames: int = Field(
        default=5, ge=1, description="Frames (40 ms each) in the first streamed piece."
    )
    stream_piece_frames: int = Field(
        default=25, ge=1, le=100, description="Frames in each later streamed piece."
    )
    s3_bucket: str | None = Field(
        default=None, description="Bucket for audio output; with credentials, enables output=s3."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (R2, MinIO, RunPod); unset: AWS."
    )
    s3_prefix: str = Field(default="higgs-runpod/", description="Key prefix of uploaded audio.")
    s3_url_expires: int = Field(
        default=3600, ge=1, le=604_800, description="Lifetime of presigned URLs, seconds."
    )
    aws_access_key_id: SecretStr | None = Field(default=None, description="S3 access key id.")
    aws_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    aws_default_region: str | None = Field(
        default=None, description="S3 region; unset: from an AWS endpoint URL, else us-east-1."
    )
    bucket_endpoint_url: str | None = Field(
        default=None, description="RunPod's name for S3_ENDPOINT_URL (used when that is unset)."
    )
    bucket_access_key_id: SecretStr | None = Field(
        default=None, description="RunPod's name for AWS_ACCESS_KEY_ID."
    )
    bucket_secret_access_key: SecretStr | None = Field(
        default=None, description="RunPod's name for AWS_SECRET_ACCESS_KEY."
    )
    max_inline_audio_bytes: int = Field(
        default=7_000_000,
        ge=1,
        description="Largest audio returned inline (base64 adds a third; RunPod's /run "
        "result limit is about 10 MB). Larger audio is uploaded or refused.",
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
