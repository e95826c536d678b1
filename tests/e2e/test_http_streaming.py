"""Issue 14 on the HTTP API: every format and speed streams as it is generated.

The real app under the CLI's uvicorn config in a thread, the session's tiny model, httpx as
the client; the SSE events are the stream's pieces, so each boundary can be cut at. Audio is
decoded with FFmpeg (PyAV).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from higgs_runpod.request.openai_schema import parse_openai_speech
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from support.audio import decoded
from support.servers import ThreadServer


@pytest.fixture(scope="module")
def server(settings: Settings, speech: SpeechService) -> Iterator[ThreadServer]:
    running = ThreadServer(settings.model_copy(update={"higgs_api_key": None}), speech)
    yield running
    running.stop()


def body(audio_format: str, speed: float) -> dict[str, Any]:
    return {"model": "tts-1", "input": "Streaming every format.", "voice": "alice",
            "response_format": audio_format, "speed": speed, "seed": 8,
            "max_new_tokens": 160}  # fmt: skip


@pytest.mark.parametrize(
    ("audio_format", "speed"),
    [("wav", 1.0), ("flac", 1.0), ("mp3", 1.0), ("opus", 1.0), ("aac", 1.0), ("pcm", 1.0),
     ("mp3", 1.5), ("opus", 0.8)],
)  # fmt: skip
def test_every_format_streams_and_joins_into_the_whole_file(
    server: ThreadServer, settings: Settings, speech: SpeechService, audio_format: str, speed: float
) -> None:
    """The first piece comes while the engine still generates; every prefix ending at a
    piece decodes, longer each time; joined, the pieces decode to the non-streamed file's
    samples (the same count, within one 16-bit step)."""
    engine = speech.engine
    pieces: list[bytes] = []
    generating_at_first_piece = None
    request = {**body(audio_format, speed), "stream_format": "sse"}
    with httpx.stream(
        "POST", f"{server.url}/v1/audio/speech", json=request, timeout=120
    ) as response:
        assert response.status_code == 200
        assert float(response.headers["x-time-to-first-audio-ms"]) > 0
        for line in response.iter_lines():
            event = json.loads(line.removeprefix("data: ")) if line else {}
            if event.get("type") == "speech.audio.delta":
                if not pieces:
                    generating_at_first_piece = engine.running
                pieces.append(base64.b64decode(event["audio"]))
    assert generating_at_first_piece == 1
    assert len(pieces) > 2
    rate = 24_000
    lengths = [len(decoded(b"".join(pieces[:end]), audio_format, rate))
               for end in range(1, len(pieces) + 1)]  # fmt: skip
    assert lengths[0] > 0 and lengths == sorted(lengths)

    parsed = parse_openai_speech(body(audio_format, speed), settings)
    whole = asyncio.run(speech.speak(parsed.request)).audio
    streamed, plain = (
        decoded(b"".join(pieces), audio_format, rate),
        decoded(whole, audio_format, rate),
    )
    assert len(streamed) == len(plain) == lengths[-1]
    assert np.abs(streamed.astype(np.int32) - plain.astype(np.int32)).max() <= 1
