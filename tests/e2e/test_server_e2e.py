"""End to end over HTTP through RunPod's real local API server (`higgs-runpod serve`)."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator

import av
import httpx
import numpy as np
import pytest

from support.audio import b64, decoded, make_wav
from support.servers import LocalServer

FRAME_S = 0.04
CLIP = make_wav(seconds=1.0, freq=180.0)
CLIP2 = make_wav(seconds=1.2, freq=300.0)


@pytest.fixture(scope="module")
def clip_url() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(CLIP)))
            self.end_headers()
            self.wfile.write(CLIP)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/ref.wav"
    server.shutdown()


def probe(data: bytes) -> tuple[int, int, float]:
    """(sample rate, channels, seconds) as FFmpeg decodes the bytes."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return (
            stream.codec_context.sample_rate,
            stream.codec_context.channels,
            samples / stream.codec_context.sample_rate,
        )


def completed(server: LocalServer, job_input: dict) -> dict:
    result = server.runsync({"max_new_tokens": 30, "seed": 1, **job_input})
    assert result["status"] == "COMPLETED", result
    return result["output"]


@pytest.mark.parametrize(
    "job_input",
    [
        pytest.param({"text": "Hello there."}, id="smart-voice"),
        pytest.param({"text": "Hi", "voice": {"audio_base64": b64(CLIP), "transcript": "A tone."}}, id="clone-base64"),
        pytest.param({"text": "Hi", "voice": "alice"}, id="preset"),
        pytest.param({"text": "Hi", "voice": {"description": "a calm voice"}, "scene": "A quiet room."}, id="described"),
        pytest.param(
            {
                "text": "[SPEAKER0] Hello. [SPEAKER1] Hi there.",
                "speakers": {
                    "SPEAKER0": {"audio_base64": b64(CLIP), "transcript": "One."},
                    "SPEAKER1": {"audio_base64": b64(CLIP2), "transcript": "Two."},
                },
            },
            id="two-cloned-speakers",
        ),
        pytest.param({"text": "[SPEAKER0] Hello. [SPEAKER1] Hi."}, id="smart-dialogue"),
    ],
)  # fmt: skip
def test_requests_produce_audio_of_the_generated_length(
    local_server: LocalServer, job_input: dict
) -> None:
    output = completed(local_server, job_input)
    rate, channels, seconds = probe(base64.b64decode(output["audio_base64"]))
    assert (rate, channels) == (24_000, 1)
    assert output["usage"]["audio_frames"] > 0
    assert seconds == pytest.approx(output["usage"]["audio_frames"] * FRAME_S, abs=1e-6)


def test_clone_from_url_on_loopback(local_server: LocalServer, clip_url: str) -> None:
    output = completed(
        local_server, {"text": "Hi", "voice": {"audio_url": clip_url, "transcript": "A tone."}}
    )
    assert output["usage"]["audio_frames"] > 0
    # The reference clip is in the prompt: 1 s of audio is 25 frames of codes plus markers.
    plain = completed(local_server, {"text": "Hi"})
    assert output["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 25


@pytest.mark.parametrize(
    ("audio_format", "sample_rate", "padding_s"),
    [
        ("wav", 24_000, 0.0),
        ("wav", 16_000, 0.0),
        ("flac", 48_000, 0.0),
        ("mp3", 24_000, 0.1),
        ("opus", 48_000, 0.03),
        ("aac", 24_000, 0.1),
    ],
)
def test_every_format_decodes(
    local_server: LocalServer, audio_format: str, sample_rate: int, padding_s: float
) -> None:
    output = completed(
        local_server, {"text": "Formats.", "format": audio_format, "sample_rate": sample_rate}
    )
    assert output["format"] == audio_format
    rate, channels, seconds = probe(base64.b64decode(output["audio_base64"]))
    expected = output["usage"]["audio_frames"] * FRAME_S
    assert channels == 1
    assert rate == (48_000 if audio_format == "opus" else sample_rate)  # Opus always decodes at 48k
    assert expected - FRAME_S <= seconds <= expected + FRAME_S + padding_s


def test_pcm_is_raw_samples(local_server: LocalServer) -> None:
    output = completed(local_server, {"text": "Raw.", "format": "pcm", "sample_rate": 16_000})
    raw = base64.b64decode(output["audio_base64"])
    assert output["content_type"] == "audio/L16"
    assert len(raw) == 2 * round(output["usage"]["audio_frames"] * FRAME_S * 16_000)


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        ({}, "text: is required"),
        ({"text": ""}, "text: must not be empty"),
        ({"text": "x" * 2001, "chunking": {"method": "none"}}, "text: is 2001 characters long; the limit is 2000"),
        ({"text": "a", "stream": True}, "stream: this endpoint streams only when started with ENABLE_STREAMING=true"),
        ({"text": "a", "volume": 3}, "volume: unknown field"),
        ({"text": ["a"]}, "text: input should be a valid string"),
        ({"text": "a", "temperature": "hot"}, "temperature: input should be a valid number"),
        ({"text": "a", "temperature": 3}, "temperature: input should be less than or equal to 2"),
        ({"text": "a", "top_k": 5000}, "top_k: input should be less than or equal to 1024"),
        ({"text": "a", "voice": "nobody"}, "voice: unknown voice 'nobody'"),
        ({"text": "a", "voice": {"audio_base64": b64(b"x" * 2000), "transcript": "t"}}, "voice.audio_base64: audio could not be decoded"),
        ({"text": "a", "voice": {"audio_base64": b64(make_wav(seconds=31)), "transcript": "t"}}, "longer than 30 seconds"),
        ({"text": "a", "voice": {"audio_base64": "A" * 14_000_000, "transcript": "t"}}, "larger than 10000000 bytes"),
        ({"text": "a", "voice": {"audio_url": "ftp://127.0.0.1/x.wav", "transcript": "t"}}, "must be an https or http URL"),
        ({"text": "a", "format": "wma"}, "format: input should be"),
        ({"text": "[SPEAKER0] a [SPEAKER2] b", "speakers": {"SPEAKER0": "alice"}}, "speakers: text uses [SPEAKER2] but speakers has no SPEAKER2"),
    ],
)  # fmt: skip
def test_bad_input_fails_the_job_and_the_worker_keeps_serving(
    local_server: LocalServer, job_input: dict, message: str
) -> None:
    result = local_server.runsync(job_input)
    assert result["status"] == "FAILED"
    assert message in result["error"]
    assert "Traceback" not in result["error"]
    assert (
        completed(local_server, {"text": "Still here.", "max_new_tokens": 8})["usage"][
            "generated_tokens"
        ]
        == 8
    )


def test_private_addresses_refused_by_default(
    base_env: dict, tmp_path_factory: pytest.TempPathFactory, clip_url: str
) -> None:
    """A server with the default settings: http and loopback URLs are both refused."""
    server = LocalServer(base_env, tmp_path_factory.mktemp("strict") / "server.log")
    try:
        server.wait_ready()
        https_url = clip_url.replace("http://", "https://")
        for url, message in [
            (clip_url, "must be an https URL"),
            (https_url, "private or loopback"),
        ]:
            result = server.runsync({"text": "a", "voice": {"audio_url": url, "transcript": "t"}})
            assert result["status"] == "FAILED"
            assert message in result["error"]
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("audio_format", "speed"),
    [("wav", 1.0), ("flac", 1.0), ("mp3", 1.0), ("opus", 1.0), ("aac", 1.0), ("pcm", 1.0),
     ("mp3", 1.5)],
)  # fmt: skip
def test_stream_through_the_local_api_server(
    streaming_server: LocalServer, audio_format: str, speed: float
) -> None:
    """Each /stream piece continues the file and the first leaves while the engine still
    generates: every prefix plays, and the joined pieces decode to the non-streamed file's
    samples (same length, within one 16-bit step)."""
    job = {"text": "Streaming over HTTP.", "seed": 9, "max_new_tokens": 150,
           "format": audio_format, "speed": speed}  # fmt: skip
    job_id = httpx.post(
        f"{streaming_server.url}/run", json={"input": {**job, "stream": True}}
    ).json()["id"]
    streamed = httpx.post(f"{streaming_server.url}/stream/{job_id}", timeout=120).json()
    assert streamed["status"] == "COMPLETED", streamed
    *pieces, summary = [item["output"] for item in streamed["stream"]]
    assert summary["done"] and summary["pieces"] == len(pieces) > 1
    # The first piece left before generation ended (its start: load, prepare, then decode steps;
    # 150 steps, so that generation outlasts the first piece's decode and encode on a busy box).
    timings = summary["timings_ms"]
    assert 0 < timings["first_audio"] < timings["load"] + timings["prepare"] + timings["generate"]
    audio = [base64.b64decode(piece["audio_base64"]) for piece in pieces]
    played = [len(decoded(b"".join(audio[:end]), audio_format, 24_000))
              for end in range(1, len(audio) + 1)]  # fmt: skip
    assert played == sorted(played) and played[0] > 0
    joined = b"".join(audio)
    if audio_format != "pcm":
        rate, channels, _ = probe(joined)
        assert channels == 1 and rate == (48_000 if audio_format == "opus" else 24_000)
    expected = summary["usage"]["audio_frames"] * FRAME_S / speed
    tolerance = 0.02 if audio_format in ("wav", "pcm") else 0.12
    assert played[-1] / 24_000 == pytest.approx(expected, abs=tolerance)
    assert sum(piece["frames"] for piece in pieces) == summary["usage"]["audio_frames"]
    # The same request without stream: the generator handler's one output, the whole file.
    whole = streaming_server.runsync(job)
    assert whole["status"] == "COMPLETED"
    [output] = whole["output"]
    plain = decoded(base64.b64decode(output["audio_base64"]), audio_format, 24_000)
    joined_pcm = decoded(joined, audio_format, 24_000)
    assert len(plain) == len(joined_pcm)
    # one step of 16-bit rounding at most
    assert np.abs(plain.astype(np.int32) - joined_pcm.astype(np.int32)).max() <= 1


def test_stream_errors_come_as_the_output(streaming_server: LocalServer) -> None:
    """RunPod fails a job whose generator yields an error; the local simulator shows the item."""
    result = streaming_server.runsync({"text": "a", "stream": True, "speed": 9.0})
    assert result["output"] == [{"error": "speed: input should be less than or equal to 4"}]
