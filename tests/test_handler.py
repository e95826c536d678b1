"""The handler in-process: response shape, error shapes, and the worker staying up."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest

from higgs_runpod.fronts import runpod as handler_module
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.audio import decode
from support.servers import free_port


def run(worker: Worker, job_input: object) -> dict:
    return asyncio.run(worker.handle({"id": "job-1", "input": job_input}))


def test_response_fields(worker: Worker) -> None:
    output = run(worker, {"text": "Hello", "max_new_tokens": 25, "seed": 3})
    assert set(output) == {
        "delivery", "audio_base64", "size_bytes", "format", "content_type", "sample_rate",
        "duration_s", "seed", "usage", "chunks", "timings_ms", "real_time_factor", "voice_codes",
    }  # fmt: skip
    assert (output["format"], output["content_type"], output["seed"]) == ("wav", "audio/wav", 3)
    assert set(output["timings_ms"]) == {
        "load", "prepare", "voice_encode", "generate", "decode", "encode", "total"
    }  # fmt: skip
    assert output["voice_codes"] == {"library": 0, "memory": 0, "disk": 0, "encoded": 0}
    assert output["usage"]["generated_tokens"] == 25
    assert output["chunks"] == [
        {
            "index": 0,
            "text_start": 0,
            "text_end": 5,
            "frames": output["usage"]["audio_frames"],
            "duration_s": output["duration_s"],
            "generate_ms": output["chunks"][0]["generate_ms"],
        }
    ]
    frames = output["usage"]["audio_frames"]
    assert output["duration_s"] == pytest.approx(frames * 0.04)
    clip = decode(base64.b64decode(output["audio_base64"]), 24_000)
    assert clip.duration_s == pytest.approx(frames * 0.04)
    assert output["real_time_factor"] > 0


def test_internal_error_is_short_and_logged(
    worker: Worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    with monkeypatch.context() as patch:
        patch.setattr(worker.service.engine, "synthesize", broken)
        output = run(worker, {"text": "Hello"})
    assert output == {
        "error": "internal error while generating speech (job job-1); "
        "the worker log has the details"
    }
    assert "secret internal detail" in caplog.text  # the detail is in the log only
    assert "audio_base64" in run(worker, {"text": "Hello", "max_new_tokens": 10})


def test_request_error_is_the_message(worker: Worker) -> None:
    assert run(worker, {"text": "Hi", "top_p": 2}) == {
        "error": "top_p: input should be less than or equal to 1"
    }
    assert run(worker, None) == {"error": "input: must be a JSON object"}


def test_missing_model_fails_the_job_cleanly(tmp_path: Path) -> None:
    """No weights and no reachable hub (a closed loopback port): the job fails, clearly."""
    hub = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(
        {
            "MODEL_PATH": str(tmp_path / "m"),
            "TOKENIZER_PATH": str(tmp_path / "t"),
            "HF_ENDPOINT": hub,
        }
    )
    output = run(Worker(SpeechService(settings)), {"text": "Hello"})
    assert output["error"].startswith(
        f"could not download bosonai/higgs-audio-v2-generation-3B-base from {hub}"
    )
    assert "Traceback" not in output["error"]


def test_module_handler_uses_environment(
    monkeypatch: pytest.MonkeyPatch, base_env: dict[str, str]
) -> None:
    for name, value in base_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(handler_module, "_worker", None)
    output = asyncio.run(
        handler_module.handler({"id": "x", "input": {"text": "Hi", "max_new_tokens": 8}})
    )
    assert output["usage"]["generated_tokens"] == 8
    assert handler_module.get_worker() is handler_module.get_worker()
    monkeypatch.setattr(handler_module, "_worker", None)
