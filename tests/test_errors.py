"""Each front's one error function, through the real fronts on the tiny model: out of
memory (HTTP 503 with Retry-After, WebSocket 1013, RunPod's message), the caller's errors
with their own status and code, and a bug of ours without its detail.

No GPU here: out of memory is CUDA's own error, raised where a GPU would raise it (the
model's forward, which only prefill uses, inside the engine's decode loop; the audio
decoder, outside it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from higgs_runpod.errors import OUT_OF_MEMORY
from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.fronts.speech_ws import STREAM_ROUTE
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.engine import Engine

SPEECH = {"model": "tts-1", "input": "Hello.", "max_new_tokens": 20, "response_format": "wav"}


def out_of_memory(*args: object, **kwargs: object) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def client(settings: Settings, speech: SpeechService) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"higgs_api_key": None}), speech)) as c:
        yield c


@pytest.fixture(params=["prefill", "decode"])
def no_memory(request: pytest.FixtureRequest, engine: Engine) -> Iterator[None]:
    """The device out of memory in the engine's prefill, or in the audio decoder."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "prefill":
            patch.setattr(engine.model, "forward", out_of_memory)
        else:
            patch.setattr(engine, "decode_codes", out_of_memory)
        yield


def test_out_of_memory_is_503_with_retry_after(client: TestClient, no_memory: None) -> None:
    response = client.post("/v1/audio/speech", json=SPEECH)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert response.json() == {
        "error": {"message": OUT_OF_MEMORY, "type": "server_error", "param": None, "code": None}
    }


def test_out_of_memory_in_a_websocket_closes_with_try_again_later(
    client: TestClient, no_memory: None
) -> None:
    with client.websocket_connect(STREAM_ROUTE) as socket:
        socket.send_json({k: v for k, v in SPEECH.items() if k != "input"})
        socket.send_json({"text": "Hello.", "close": True})
        messages = receive_all(socket)
    assert messages[-2:] == [{"type": "error", "message": OUT_OF_MEMORY}, ("close", 1013)]


def test_out_of_memory_fails_a_queue_job_with_its_message(worker: Worker, no_memory: None) -> None:
    job = {"id": "job-1", "input": {"text": "Hello.", "max_new_tokens": 20}}
    assert asyncio.run(worker.handle(job)) == {"error": OUT_OF_MEMORY}


def test_the_callers_errors_carry_their_status_and_code(client: TestClient) -> None:
    missing = client.get("/v1/audio/voices/nobody")
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "name: no library voice is called 'nobody'",
        "type": "invalid_request_error", "param": "name", "code": "voice_not_found",
    }  # fmt: skip
    bad = client.post("/v1/audio/speech", json={**SPEECH, "speed": 9})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "speed")
    assert "retry-after" not in bad.headers
    unknown = client.get("/v1/nothing-here")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"


def test_a_bug_is_500_without_its_detail(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail at /opt/internal/path")

    monkeypatch.setattr(engine, "decode_codes", broken)
    response = client.post("/v1/audio/speech", json=SPEECH)
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "retry-after" not in response.headers
    with client.websocket_connect(STREAM_ROUTE) as socket:
        socket.send_json({k: v for k, v in SPEECH.items() if k != "input"})
        socket.send_json({"text": "Hello.", "close": True})
        messages = receive_all(socket)
    assert messages[-1] == ("close", 1011)
    assert "secret" not in str(messages)


def receive_all(socket: Any) -> list[Any]:
    """Every JSON message of a session, then ("close", code)."""
    messages: list[Any] = []
    while True:
        try:
            message = socket.receive()
        except WebSocketDisconnect as closed:
            return [*messages, ("close", closed.code)]
        if message["type"] == "websocket.close":
            return [*messages, ("close", message["code"])]
        if message.get("text") is not None:
            messages.append(json.loads(message["text"]))
