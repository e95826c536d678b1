"""Issue 12's bounds on one request's work, on the real tiny model through `Worker`:
total frames, prompt tokens, speakers, speaker numbers, the deadline, and zero-frame results
in every format, streamed and not. The HTTP front's side of them is in test_http_bounds.py.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.audio import decode
from higgs_runpod.synthesis.engine import Engine
from support.audio import make_wav

FORMATS = ("wav", "flac", "pcm", "mp3", "opus", "aac")
EMPTY_IMPOSSIBLE = {"mp3", "opus", "aac"}  # an empty file of these does not decode


def worker_with(base_env: dict[str, str], engine: Engine, **env: str) -> Worker:
    return Worker(SpeechService(load_settings({**base_env, **env}), engine))


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(worker.handle({"id": "bounds", "input": job_input}))


def run_stream(worker: Worker, job_input: dict[str, Any]) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        job = {"id": "bounds", "input": {**job_input, "stream": True}}
        return [item async for item in worker.handle_stream(job)]

    return asyncio.run(collect())


def wait_until_idle(engine: Engine, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0, "the engine still holds the timed-out request"


def test_many_turns_are_refused_before_any_generation(worker: Worker, engine: Engine) -> None:
    started = time.perf_counter()
    output = run(worker, {"text": "[SPEAKER0] a" * 8000})
    assert output["error"].startswith("max_new_tokens: 8000 chunks x 2048 ask for up to")
    assert "at most 90000 (MAX_TOTAL_FRAMES" in output["error"]
    assert time.perf_counter() - started < 10 and engine.running == 0


def test_a_prompt_over_max_prompt_tokens_is_refused(
    base_env: dict[str, str], engine: Engine
) -> None:
    worker = worker_with(base_env, engine, MAX_PROMPT_TOKENS="60")
    output = run(worker, {"text": "Hello there, how are you today? " * 5, "max_new_tokens": 8})
    assert output["error"].startswith("text: the prompt of chunk 1 is ")
    assert "the limit is 60 (MAX_PROMPT_TOKENS)" in output["error"]
    assert "audio_base64" in run(worker, {"text": "Hi.", "max_new_tokens": 8})


@pytest.fixture
def clip_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback server of one reference clip that records every request it gets."""
    hits: list[str] = []
    body = make_wav(seconds=1.0)

    class Clip(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Clip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/clip.wav", hits
    finally:
        server.shutdown()
        server.server_close()


def test_an_unused_speaker_is_refused_before_any_download(
    base_env: dict[str, str], engine: Engine, clip_server: tuple[str, list[str]]
) -> None:
    url, hits = clip_server
    worker = worker_with(
        base_env, engine, ALLOW_HTTP_AUDIO_URLS="1", ALLOW_PRIVATE_AUDIO_URLS="1",
        OUTBOUND_ALLOWED_NETWORKS="127.0.0.1/32",
    )  # fmt: skip
    speakers = {"SPEAKER0": "alice", "SPEAKER1": {"audio_url": url, "transcript": "Hello."}}
    output = run(worker, {"text": "[SPEAKER0] Hi.", "speakers": speakers, "max_new_tokens": 8})
    assert output["error"].startswith("speakers: has SPEAKER1, but the text has no [SPEAKER1]")
    many = {f"SPEAKER{n}": {"audio_url": f"{url}?{n}", "transcript": "Hi."} for n in range(9)}
    output = run(worker, {"text": "[SPEAKER0] Hi.", "speakers": many, "max_new_tokens": 8})
    assert output["error"] == "speakers: has 9 entries; the limit is 8 (MAX_SPEAKERS)"
    assert hits == []


def test_a_huge_speaker_number_is_spoken_as_text(worker: Worker) -> None:
    text = "[SPEAKER" + "9" * 5000 + "] hi"
    output = run(worker, {"text": text, "max_new_tokens": 8, "chunking": {"context_chunks": 0}})
    assert "audio_base64" in output, output
    assert len(output["chunks"]) == 3  # 5014 characters, cut at MAX_TEXT_CHARS (2000)


def test_a_job_past_its_deadline_is_stopped_and_the_worker_serves_on(
    base_env: dict[str, str], engine: Engine
) -> None:
    worker = worker_with(base_env, engine, REQUEST_TIMEOUT_S="1")
    long_job = {"text": "On and on.", "seed": 1, "max_new_tokens": 2048}  # ~40 s on this CPU
    started = time.perf_counter()
    output = run(worker, long_job)
    assert output == {
        "error": "the request took longer than 1 s (REQUEST_TIMEOUT_S) and was stopped"
    }
    streamed = run_stream(worker, long_job)
    assert streamed[-1] == output
    assert time.perf_counter() - started < 10
    wait_until_idle(engine)
    assert "audio_base64" in run(worker, {"text": "Hi.", "max_new_tokens": 8})


def joined(items: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(item["audio_base64"]) for item in items[:-1])


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("audio_format", FORMATS)
def test_zero_frames_give_an_empty_file_or_a_clear_error(
    worker: Worker, audio_format: str, streamed: bool
) -> None:
    job = {"text": "Hi", "max_new_tokens": 1, "format": audio_format, "seed": 1}
    if streamed:
        items = run_stream(worker, job)
        summary, data = items[-1], joined(items)
    else:
        summary = run(worker, job)
        data = base64.b64decode(summary.get("audio_base64", ""))
    if audio_format in EMPTY_IMPOSSIBLE:
        assert summary == {
            "error": f"format: the model made no audio (0 frames), and {audio_format} cannot "
            "hold none: raise max_new_tokens, or ask for wav, flac or pcm"
        }
        return
    assert summary["usage"]["audio_frames"] == 0 and summary["duration_s"] == 0.0
    if audio_format == "pcm":
        assert data == b""
    else:
        assert len(decode(data, 24_000).samples) == 0  # FFmpeg opens it: a valid empty file


def test_context_chunks_that_would_overflow_the_window_are_dropped(worker: Worker) -> None:
    """Three chunks of 2000 digits: with two chunks of context the prompt would be over
    MAX_CONTEXT_TOKENS (4096), so the oldest context goes instead of the job failing."""
    output = run(worker, {"text": "[SPEAKER" + "9" * 5000 + "] hi", "max_new_tokens": 8})
    assert "audio_base64" in output, output
    assert len(output["chunks"]) == 3
