"""The HTTP front's settings (the OpenAI-compatible server and its WebSocket route): a base
of `settings.Settings`, which is the one class the worker builds and passes around.

Kept apart only to keep each module short; read them through `load_settings()`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


def blank_is_unset(value: object) -> object:
    """An empty key (an unset RunPod secret) means no key, not the key ""."""
    return None if isinstance(value, str) and not value.strip() else value


class HttpSettings(BaseSettings):
    """The HTTP server's knobs; the README's configuration table lists them with the rest."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    http_host: str = Field(default="0.0.0.0", description="Address the HTTP server binds.")
    port: int = Field(
        default=8000,
        ge=1,
        le=65535,
        description="HTTP server port (RunPod sets PORT).",
    )
    higgs_api_key: SecretStr | None = Field(
        default=None,
        description="When set, HTTP routes but /ping and / need this key in X-API-Key (or as "
        "the Bearer key where HTTP_BEARER_AUTH allows it).",
    )
    http_bearer_auth: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Also take HIGGS_API_KEY as `Authorization: Bearer`; auto: only off RunPod "
        "(RUNPOD_ENDPOINT_ID unset), since RunPod's gateway takes that header for its own key.",
    )
    http_allow_no_key: bool = Field(
        default=False,
        description="Let the HTTP server listen beyond loopback without HIGGS_API_KEY.",
    )
    runpod_endpoint_id: str | None = Field(
        default=None, description="Set by RunPod on its workers; never set it yourself."
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
    http_body_timeout_s: float = Field(
        default=30.0, gt=0, description="Time to receive a whole request body (HTTP 408 after)."
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time for a request's headers to arrive, from the connection or the end of "
        "the previous response; the connection is closed after it.",
    )
    http_keep_alive_s: float = Field(
        default=5.0, gt=0, description="How long an idle keep-alive connection stays open."
    )
    http_max_connections: int = Field(
        default=64,
        ge=1,
        description="Open connections at once; a request on a connection beyond it gets HTTP 503.",
    )
    ws_max_message_chars: int = Field(
        default=4000,
        ge=1,
        description='Longest text in one WebSocket `{"text"}` message (/v1/audio/speech/stream).',
    )
    ws_max_buffered_chars: int = Field(
        default=8000,
        ge=1,
        description="Text a WebSocket session may hold waiting to be spoken; more ends it.",
    )
    ws_max_session_frames: int = Field(
        default=45_000,
        ge=1,
        description="Audio frames (40 ms each) one WebSocket session may generate in all.",
    )
    ws_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a WebSocket session may wait for its config or its next message "
        "while it has nothing to generate or send; it is closed after it.",
    )

    @field_validator("higgs_api_key", mode="before")
    @classmethod
    def _blank_key_is_no_key(cls, value: object) -> object:
        return blank_is_unset(value)

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
