"""Settings, read from environment variables (one class per side, built in a function).

Nothing reads the environment at import time: `load_settings()` builds the worker's
`Settings` (its HTTP part in `http_settings`) and `load_client_settings()` the
`ClientSettings` of the commands that call a worker or RunPod's API (speak, voices,
deploy), from `os.environ` or from a mapping (tests). These are the only environment
reads of the package besides `container/`, which runs before pydantic is installed and
reads its few variables itself; the defaults both sides need (the volume's mount point,
the ready file) are the container's constants, used here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from higgs_runpod.container.bootstrap import DEFAULT_VOLUME_PATH
from higgs_runpod.container.health import DEFAULT_READY_FILE
from higgs_runpod.http_settings import HttpSettings, blank_is_unset

AnySettings = TypeVar("AnySettings", bound=BaseSettings)


def _default_voices_path(data: dict[str, Any]) -> Path:
    volume: Path = data["volume_path"]
    return volume / "voices" if volume.is_dir() else Path("voices")


def _default_voice_cache_path(data: dict[str, Any]) -> Path | None:
    volume: Path = data["volume_path"]
    return volume / "voice-cache" if volume.is_dir() else None


def _checkpoint_root(volume: Path) -> Path:
    """Where checkpoints go by default: the network volume when mounted, else the user's cache."""
    if volume.is_dir():
        return volume
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "higgs-runpod"


class Settings(HttpSettings):
    """Every knob of the worker; the README's configuration table mirrors this class."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    volume_path: Path = Field(
        default=Path(DEFAULT_VOLUME_PATH),
        description="Where the network volume is mounted; the defaults of the paths below "
        "are on it when it exists.",
    )

    # None only until validation ends: `_default_checkpoint_paths` derives them from the repos.
    model_path: Path | None = Field(
        default=None,
        description="Directory of the generation model (transformers format); default "
        "/runpod-volume/ORG/NAME of MODEL_REPO when the volume is mounted, else "
        "~/.cache/higgs-runpod/ORG/NAME.",
    )
    tokenizer_path: Path | None = Field(
        default=None,
        description="Directory of the audio tokenizer (transformers format); default derived "
        "from TOKENIZER_REPO like MODEL_PATH.",
    )
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    lazy_load: bool = Field(
        default=False, description="Load the model on the first request instead of at start."
    )
    voices_path: Path = Field(default_factory=_default_voices_path)
    max_text_chars: int = Field(
        default=2000,
        ge=32,
        description="Longest text said in one go, and longest chunk once normalised.",
    )
    max_long_text_chars: int = Field(
        default=100_000, ge=1, description="Longest text when chunking is on (the default)."
    )
    max_new_tokens_limit: int = Field(default=2048, ge=1)
    max_prompt_tokens: int = Field(
        default=2048,
        ge=16,
        description="Most prompt tokens of one chunk before its context chunks (the chunk's "
        "text, the scene, the reference audio), checked before any generation.",
    )
    max_total_frames: int = Field(
        default=90_000,
        ge=1,
        description="Most audio frames (40 ms each) one request may ask for: its chunks times "
        "max_new_tokens (90000 is one hour).",
    )
    max_speakers: int = Field(
        default=8,
        ge=1,
        le=100,
        description="Most distinct [SPEAKERn] tags one text may use (and entries in speakers).",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline of one request (queue job or HTTP), from its start to its last "
        "byte; a request past it is stopped and answered with a timeout error.",
    )
    max_ref_audio_bytes: int = Field(default=10_000_000, ge=1)
    max_ref_audio_seconds: float = Field(default=30.0, gt=0)
    audio_url_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Deadline of a whole audio_url download: resolving, connecting and every byte.",
    )
    audio_url_min_bytes_per_s: int = Field(
        default=32_000,
        ge=0,
        description="Slowest average rate an audio_url download may keep after its first "
        "2 seconds; 0: no minimum.",
    )
    allow_http_audio_urls: bool = Field(
        default=False, description="Allow plain http:// audio_url and s3Config.endpointUrl."
    )
    allow_private_audio_urls: bool = Field(
        default=False,
        description="Allow audio_url and s3Config.endpointUrl to reach any address, private "
        "and loopback included.",
    )
    outbound_allowed_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = Field(
        default=(),
        description="Networks (comma-separated CIDRs, as `10.0.0.0/8,::1/128`) that "
        "audio_url and s3Config.endpointUrl may reach although they are private.",
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
    model_repo: str = Field(
        default="bosonai/higgs-audio-v2-generation-3B-base",
        description="Hugging Face repo of the generation model, downloaded into MODEL_PATH.",
    )
    tokenizer_repo: str = Field(
        default="bosonai/higgs-audio-v2-tokenizer",
        description="Hugging Face repo of the audio tokenizer, downloaded into TOKENIZER_PATH.",
    )
    model_revision: str = Field(
        default="main", description="Branch, tag or (recommended) commit hash of MODEL_REPO."
    )
    tokenizer_revision: str = Field(
        default="main", description="Branch, tag or (recommended) commit hash of TOKENIZER_REPO."
    )
    hf_token: SecretStr | None = Field(
        default=None, description="Hugging Face token for gated or private repos (never logged)."
    )
    hf_endpoint: str | None = Field(
        default=None, description="Hub (or mirror) URL; default https://huggingface.co."
    )
    hf_cached_models_path: Path = Field(
        default_factory=lambda data: data["volume_path"] / "huggingface-cache" / "hub",
        description="RunPod's cached-models directory (a Hugging Face hub cache); a configured "
        "repo found there is loaded from it instead of being downloaded.",
    )
    download_wait_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="How long a worker waits for another worker's download of a checkpoint.",
    )
    download_lock_stale_s: float = Field(
        default=60.0,
        ge=5,
        description="A download lock whose heartbeat stopped this long ago is taken over.",
    )

    ready_file: Path = Field(
        default=Path(DEFAULT_READY_FILE),
        description="Written by the worker once its model is loaded; read by the health check.",
    )
    voice_cache_items: int = Field(
        default=256,
        ge=0,
        description="Reference clips whose audio codes are kept in memory (least recently "
        "used dropped first); 0 keeps none in memory.",
    )
    voice_cache_path: Path | None = Field(
        default_factory=_default_voice_cache_path,
        description="Directory for encoded reference clips, shared across restarts and "
        "workers; default /runpod-volume/voice-cache when the volume is mounted, else unset "
        "(memory only).",
    )
    voice_cache_max_mb: float = Field(
        default=1024.0,
        gt=0,
        description="Most megabytes of encoded clips in VOICE_CACHE_PATH; beyond it the files "
        "used longest ago are deleted (library voices keep their codes in their own folder).",
    )
    max_voices: int = Field(
        default=1000, ge=0, description="Most voices the library may hold (creates refused beyond)."
    )
    take_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long a take remembered by `remember_take` can be kept as a voice.",
    )
    max_takes: int = Field(
        default=100,
        ge=1,
        description="Most remembered takes on the volume; writing one deletes the oldest beyond.",
    )
    voice_require_consent: bool = Field(
        default=False, description="Refuse a new library voice (or a kept take) without `consent`."
    )
    voice_allow_openai_names: bool = Field(
        default=False,
        description="Let library voices take OpenAI's voice names (alloy, echo, ...), which then "
        "win over OPENAI_VOICE_MAP; off, those names are reserved.",
    )
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most requests decoding at once (KV-cache slots); the worker takes this "
        "many jobs at once. Fewer when the KV-cache budget cannot hold this many contexts.",
    )
    max_context_tokens: int = Field(
        default=4096,
        ge=64,
        description="Tokens one request's slot holds: prompt (text, reference and context "
        "codes) plus max_new_tokens; capped by the model's max_position_embeddings.",
    )
    kv_cache_memory_fraction: float = Field(
        default=0.8,
        gt=0.0,
        le=0.95,
        description="Share of the device memory still free after loading (RAM on a CPU) "
        "that the KV cache may take; sets how many slots fit.",
    )
    kv_cache_tokens: int = Field(
        default=0,
        ge=0,
        description="KV-cache budget in tokens; 0 computes it from KV_CACHE_MEMORY_FRACTION.",
    )
    prompt_cache_tokens: int = Field(
        default=4096,
        ge=0,
        description="Tokens of recent prompts whose keys and values are kept, so a prompt that "
        "begins as one of them (the system prompt, a clone's reference clip, a long text's "
        "chunk before) prefills only the rest; taken from what the slots leave of the "
        "KV-cache budget. 0 turns it off.",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="Capture the decode step as CUDA graphs at start-up (GPU only; falls back "
        "to eager decoding, with a log line, if capture fails).",
    )

    @model_validator(mode="after")
    def _default_checkpoint_paths(self) -> Settings:
        root = _checkpoint_root(self.volume_path)
        if self.model_path is None:
            self.model_path = root / self.model_repo
        if self.tokenizer_path is None:
            self.tokenizer_path = root / self.tokenizer_repo
        return self

    worker_mode: Literal["queue", "http"] = Field(
        default="queue",
        description="What `higgs-runpod start` runs: RunPod's job queue or the HTTP server.",
    )
    runpod_webhook_post_output: str | None = Field(
        default=None,
        description="Set by RunPod on its workers (job progress goes there); never set it.",
    )

    @field_validator("outbound_allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: object) -> object:
        """`10.0.0.0/8,::1/128` (an env var) or a sequence of CIDRs."""
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple):
            return tuple(ip_network(item) for item in value)
        return value


class ClientSettings(BaseSettings):
    """What the commands that call a worker or RunPod's API read (`speak`, `voices`,
    `deploy`); a worker reads none of it. HIGGS_API_KEY is the key a server wants, sent."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    runpod_api_key: SecretStr | None = Field(
        default=None,
        description="RunPod API key: `deploy` uses it; `speak` and `voices` send it to "
        "RunPod's API hosts only (client.key_goes_to).",
    )
    runpod_api_url: str = Field(
        default="https://api.runpod.io",
        description="RunPod REST API (v2) base URL, used only by `higgs-runpod deploy`.",
    )
    higgs_api_key: SecretStr | None = Field(
        default=None, description="The key `voices --http` sends to an HTTP server."
    )

    @field_validator("runpod_api_key", "higgs_api_key", mode="before")
    @classmethod
    def _blank_key_is_no_key(cls, value: object) -> object:
        return blank_is_unset(value)

    @property
    def runpod_key(self) -> str | None:
        return _plain(self.runpod_api_key)

    @property
    def higgs_key(self) -> str | None:
        return _plain(self.higgs_api_key)


def _plain(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def _build(cls: type[AnySettings], env: Mapping[str, str] | None) -> AnySettings:
    env = os.environ if env is None else env
    fields = {name: env[name.upper()] for name in cls.model_fields if name.upper() in env}
    return cls.model_validate(fields)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the worker's settings from `env` (default: the process environment)."""
    return _build(Settings, env)


def load_client_settings(env: Mapping[str, str] | None = None) -> ClientSettings:
    """Build the client commands' settings from `env` (default: the process environment)."""
    return _build(ClientSettings, env)
