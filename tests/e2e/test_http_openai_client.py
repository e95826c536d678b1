"""End to end: `higgs-runpod start` with WORKER_MODE=http on a loopback port, the real tiny
model, and the official `openai` Python package as the client (the compatibility proof).

Every response format is decoded with a real decoder (FFmpeg through PyAV); streaming,
SSE, auth, errors, concurrency and client disconnects go over a real socket.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import soundfile

from higgs_runpod.synthesis import audio
from support.servers import HttpServer, serving

KEY = "test-key-0123456789"
CHUNK_BYTES = 4096
MAX_BODY = 200_000


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {
        **base_env,
        "HIGGS_API_KEY": KEY,
        "HTTP_STREAM_CHUNK_BYTES": str(CHUNK_BYTES),
        "HTTP_MAX_BODY_BYTES": str(MAX_BODY),
        "OPENAI_VOICE_MAP": "alloy=alice",
    }
    with serving(HttpServer(env, tmp_path_factory.mktemp("http") / "server.log")) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: HttpServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def speak(client: openai.OpenAI, **fields: Any) -> bytes:
    extra = {"seed": 5, "max_new_tokens": 50, **fields.pop("extra", {})}
    fields = {"model": "tts-1", "voice": "echo", "input": "Hello there.", **fields}
    return client.audio.speech.create(**fields, extra_body=extra).content


def pcm_seconds(data: bytes, rate: int = 24_000) -> float:
    return len(data) / 2 / rate


@pytest.fixture(scope="module")
def reference_pcm(client: openai.OpenAI) -> bytes:
    """The default request's audio as pcm: other responses for the same seed must match it."""
    return speak(client, response_format="pcm")


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac"])
def test_every_format_decodes_to_the_same_audio(
    client: openai.OpenAI, reference_pcm: bytes, response_format: str
) -> None:
    reference = pcm_seconds(reference_pcm)
    decoded = audio.decode(speak(client, response_format=response_format), 24_000)
    assert reference > 1.0
    # Same seed, same audio; lossy codecs add at most a frame or two of padding.
    assert decoded.duration_s == pytest.approx(reference, abs=0.08)
    assert np.abs(decoded.samples).max() > 0


def test_wav_holds_exactly_the_pcm_samples(client: openai.OpenAI, reference_pcm: bytes) -> None:
    samples, rate = soundfile.read(io.BytesIO(speak(client, response_format="wav")), dtype="int16")
    assert rate == 24_000
    assert samples.ndim == 1  # mono
    assert samples.tobytes() == np.frombuffer(reference_pcm, dtype="<i2").tobytes()


def test_speed_is_honoured(client: openai.OpenAI, reference_pcm: bytes) -> None:
    normal = pcm_seconds(reference_pcm)
    fast = pcm_seconds(speak(client, response_format="pcm", speed=2.0))
    slow = pcm_seconds(speak(client, response_format="pcm", speed=0.5))
    assert fast / normal == pytest.approx(0.5, rel=0.05)
    assert slow / normal == pytest.approx(2.0, rel=0.05)


def test_voice_table_and_library_voice(client: openai.OpenAI) -> None:
    # alloy maps to the library voice alice (OPENAI_VOICE_MAP); both clone the same clip.
    assert speak(client, voice="alloy", response_format="pcm") == speak(
        client, voice="alice", response_format="pcm"
    )


def test_streaming_sends_several_chunks(server: HttpServer) -> None:
    body = {"model": "tts-1", "input": "Hi.", "voice": "nova", "response_format": "pcm",
            "seed": 5, "max_new_tokens": 50}  # fmt: skip
    with httpx.stream(
        "POST", f"{server.url}/v1/audio/speech", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        chunks = list(response.iter_raw())
    assert len(chunks) > 1
    assert sum(map(len, chunks)) > CHUNK_BYTES


def test_pcm_streams_from_the_engine_as_frames_complete(server: HttpServer) -> None:
    """Each SSE event is one piece: the first is the engine's first streamed piece (5
    frames of 40 ms at 24 kHz, 16-bit), then 25-frame pieces, not slices of a finished file."""
    body = {"model": "tts-1", "input": "Streaming from the engine.", "voice": "nova",
            "response_format": "pcm", "stream_format": "sse", "seed": 6,
            "max_new_tokens": 120}  # fmt: skip
    with httpx.stream(
        "POST", f"{server.url}/v1/audio/speech", json=body, headers=AUTH, timeout=60
    ) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line]
    deltas = [base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta"]
    frame = 960 * 2
    assert len(deltas[0]) == 5 * frame
    assert all(len(delta) == 25 * frame for delta in deltas[1:-1])
    assert events[-1]["type"] == "speech.audio.done"


def test_sse_events_carry_the_audio(client: openai.OpenAI, reference_pcm: bytes) -> None:
    plain = reference_pcm
    raw = speak(client, response_format="pcm", stream_format="sse")
    events = [
        json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")
    ]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) > 1
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == plain
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["output_tokens"] == 50


def test_errors_are_the_sdks_exceptions(server: HttpServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        speak(client, input="")
    assert bad.value.status_code == 400
    assert bad.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError, match="unknown voice 'bob'"):
        speak(client, voice="bob")
    with pytest.raises(openai.BadRequestError, match="speed"):
        speak(client, speed=9.0)
    with pytest.raises(openai.APIStatusError) as large:
        speak(client, extra={"scene": "x" * (MAX_BODY + 1)})
    assert large.value.status_code == 413


def test_auth(server: HttpServer) -> None:
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        speak(wrong)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    for path in ("/v1/audio/voices", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers=AUTH).status_code == 200
    assert httpx.get(server.url + "/ping").status_code == 200  # RunPod's health check
    assert httpx.get(server.url + "/").status_code == 200  # the page; it asks for the key


def test_models_list(client: openai.OpenAI) -> None:
    assert "higgs-audio-v2" in [model.id for model in client.models.list()]


def test_concurrent_requests_each_get_their_own_audio(
    server: HttpServer, client: openai.OpenAI
) -> None:
    jobs = [(11, 30), (12, 60), (13, 45), (14, 20)]  # (seed, max_new_tokens)
    alone = [speak(client, response_format="pcm", extra={"seed": s, "max_new_tokens": n})
             for s, n in jobs]  # fmt: skip
    assert len({len(data) for data in alone}) == len(jobs)

    async def together() -> list[bytes]:
        async_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY)
        async with async_client:
            responses = await asyncio.gather(*(
                async_client.audio.speech.create(
                    model="tts-1", voice="echo", input="Hello there.", response_format="pcm",
                    extra_body={"seed": s, "max_new_tokens": n},
                )
                for s, n in jobs
            ))  # fmt: skip
        return [response.content for response in responses]

    assert asyncio.run(together()) == alone


def test_disconnect_stops_generation(server: HttpServer, client: openai.OpenAI) -> None:
    cancelled = server.metric("higgs_speech_cancelled_total")
    body = {"model": "tts-1", "input": "Go on and on.", "voice": "echo", "seed": 1,
            "max_new_tokens": 2048}  # fmt: skip  # ~40 s of decoding on this CPU
    started = time.monotonic()
    with (
        httpx.Client() as http,
        http.stream(
            "POST", f"{server.url}/v1/audio/speech", json=body, headers=AUTH, timeout=10
        ) as response,
    ):
        # mp3 streams as it is generated: leave after the first piece; httpx then closes.
        assert next(response.iter_raw())
    deadline = time.monotonic() + 15
    while server.metric("higgs_speech_cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the server never noticed the disconnect"
        time.sleep(0.2)
    while server.metric("higgs_speech_in_flight") != 0:
        assert time.monotonic() < deadline, "the generation did not stop"
        time.sleep(0.2)
    assert time.monotonic() - started < 20  # a full generation would take ~40 s
    assert len(speak(client, response_format="pcm")) > 0  # the engine is free again
