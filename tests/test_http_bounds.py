"""Issue 12's request bounds on the HTTP front (in-process, httpx's ASGI transport, the real
tiny model): errors found while planning name OpenAI's fields, zero frames give an empty
file or a clear 400, and REQUEST_TIMEOUT_S stops a request and leaves the worker serving."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.audio import decode
from higgs_runpod.synthesis.engine import Engine


def app_with(base_env: dict[str, str], engine: Engine, **env: str) -> Any:
    settings = load_settings({**base_env, **env})
    return create_app(settings, SpeechService(settings, engine))


def post(app: Any, **fields: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            body = {"model": "tts-1", "input": "Hi.", "max_new_tokens": 8, **fields}
            return await client.post("/v1/audio/speech", json=body, timeout=60)

    return asyncio.run(main())


def test_zero_frames_are_an_empty_wav_or_a_400(base_env: dict[str, str], engine: Engine) -> None:
    app = app_with(base_env, engine)
    response = post(app, response_format="wav", max_new_tokens=1)
    assert response.status_code == 200
    assert len(decode(response.content, 24_000).samples) == 0
    response = post(app, response_format="mp3", max_new_tokens=1)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format"


def test_a_prompt_too_long_names_input(base_env: dict[str, str], engine: Engine) -> None:
    response = post(app_with(base_env, engine, MAX_PROMPT_TOKENS="60"), input="Hello there. " * 9)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input" and "MAX_PROMPT_TOKENS" in error["message"]


def test_past_the_deadline_before_any_audio_is_a_504(
    base_env: dict[str, str], engine: Engine
) -> None:
    response = post(app_with(base_env, engine, REQUEST_TIMEOUT_S="0.001"), max_new_tokens=2048)
    assert response.status_code == 504
    assert response.json()["error"] == {
        "message": "the request took longer than 0.001 s (REQUEST_TIMEOUT_S) and was stopped",
        "type": "server_error", "param": None, "code": "timeout",
    }  # fmt: skip


def test_past_the_deadline_mid_stream_the_body_breaks_and_the_worker_serves_on(
    base_env: dict[str, str], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_with(base_env, engine, REQUEST_TIMEOUT_S="1")
    started = time.perf_counter()
    # After the headers, the body is cut: a real server aborts the connection, so the
    # client sees an incomplete response, not a clean end.
    with pytest.raises(RuntimeError, match="response already started"):
        post(app, input="On and on.", max_new_tokens=2048, seed=1)  # ~40 s on this CPU
    assert time.perf_counter() - started < 10
    assert "stopped mid-stream: the request took longer than 1 s" in caplog.text
    assert "client disconnected" not in caplog.text  # a timeout is not a client that left
    while engine.running and time.perf_counter() - started < 30:
        time.sleep(0.05)
    assert engine.running == 0
    assert post(app).status_code == 200
