"""Issue 12, HTTP mode: slow and hostile clients against the real server on loopback.

The server is the one `higgs-runpod http` runs (uvicorn with `http_guard.uvicorn_config`),
in a thread of this process, on the real tiny model; the clients are raw sockets
(tests/support/slow_client.py), httpx and the official `openai` package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from higgs_runpod.fronts.http_guard import listen_refusal
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.synthesis import audio
from support.servers import ThreadServer, free_port
from support.slow_client import SlowClient, request_head

KEY = "hardening-key-5309"
BODY_TIMEOUT = 1.5
HEADER_TIMEOUT = 1.0
JSON = {"Content-Type": "application/json"}


def serve(settings: Settings, speech: SpeechService, **overrides: Any) -> ThreadServer:
    update = {"http_body_timeout_s": BODY_TIMEOUT, "http_header_timeout_s": HEADER_TIMEOUT,
              "higgs_api_key": None, **overrides}  # fmt: skip
    return ThreadServer(settings.model_copy(update=update), speech)


@pytest.fixture
def server(settings: Settings, speech: SpeechService) -> Iterator[ThreadServer]:
    running = serve(settings, speech, http_max_in_flight=4)
    yield running
    running.stop()


def speech(**fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": "Hello.", "response_format": "wav", "seed": 3,
            "max_new_tokens": 30, **fields}  # fmt: skip


# --- slow bodies ----------------------------------------------------------------------------


def test_drip_bodies_are_cut_off_while_a_normal_request_is_served(server: ThreadServer) -> None:
    drips = [
        SlowClient(server.port, request_head(length=1000), b"{" * 1000, every_s=0.2).start()
        for _ in range(3)
    ]
    time.sleep(0.3)
    assert server.service.in_flight == 3  # each counted from its first byte
    normal = httpx.post(f"{server.url}/v1/audio/speech", json=speech(), timeout=60)
    assert normal.status_code == 200
    assert audio.decode(normal.content, 24_000).duration_s > 0.5
    for drip in drips:
        answer = drip.answer(timeout=BODY_TIMEOUT + 5)
        assert answer.status == 408, answer
        assert "HTTP_BODY_TIMEOUT_S" in answer.body
        assert answer.seconds < BODY_TIMEOUT + 1.5
        assert answer.closed  # the rest of the body is not waited for
    assert server.service.in_flight == 0


def test_drips_beyond_the_in_flight_bound_get_429_at_once(server: ThreadServer) -> None:
    admitted = [
        SlowClient(server.port, request_head(length=500), b" " * 500, every_s=0.3).start()
        for _ in range(4)
    ]
    time.sleep(0.3)
    extra = SlowClient(server.port, request_head(length=500), b" " * 500, every_s=0.3).start()
    answer = extra.answer(timeout=5)
    assert answer.status == 429 and answer.closed
    assert answer.seconds < 1.0
    assert all(drip.answer(timeout=BODY_TIMEOUT + 5).status == 408 for drip in admitted)


def test_slow_and_idle_headers_are_cut_off(server: ThreadServer) -> None:
    slow = SlowClient(server.port, request_head(length=2), b"{}", drip_head=True).start()
    idle = SlowClient(server.port, b"").start()
    for client in (slow, idle):
        answer = client.answer(timeout=HEADER_TIMEOUT + 5)
        assert answer.closed and answer.status is None
        assert answer.seconds < HEADER_TIMEOUT + 1.0
    # A keep-alive connection is closed too once it idles past its own timeout.
    with httpx.Client() as client:
        assert client.get(f"{server.url}/ping").status_code == 200


def test_connections_beyond_the_bound_get_503(settings: Settings, speech: SpeechService) -> None:
    running = serve(settings, speech, http_max_connections=3)
    try:
        idle = [SlowClient(running.port, b"").start() for _ in range(3)]
        time.sleep(0.2)
        assert httpx.get(f"{running.url}/ping", timeout=5).status_code == 503
        for client in idle:
            assert client.answer(timeout=HEADER_TIMEOUT + 5).closed
        assert httpx.get(f"{running.url}/ping", timeout=5).status_code == 200
    finally:
        running.stop()


# --- hostile bodies ---------------------------------------------------------------------------


def test_bracket_bomb_is_400_and_the_server_keeps_serving(server: ThreadServer) -> None:
    for bomb in (b"[" * 200_000, b'{"input": ' + b"[" * 200_000):
        response = httpx.post(f"{server.url}/v1/audio/speech", content=bomb, headers=JSON)
        assert response.status_code == 400, response.text
        assert "nested too deeply" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/ping").status_code == 200


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
)
def test_non_json_content_types_are_415(server: ThreadServer, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    body = httpx.Request("POST", "/", json=speech()).content
    response = httpx.post(f"{server.url}/v1/audio/speech", content=body, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in response.json()["error"]["message"]


def test_json_with_a_charset_is_accepted(server: ThreadServer) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    body = httpx.Request("POST", "/", json=speech()).content
    assert httpx.post(f"{server.url}/v1/audio/speech", content=body, headers=headers,
                      timeout=60).status_code == 200  # fmt: skip


# --- keys and headers -------------------------------------------------------------------------


def keyed(settings: Settings, speech: SpeechService, **overrides: Any) -> ThreadServer:
    return serve(settings, speech, higgs_api_key=SecretStr(KEY), **overrides)


def test_x_api_key_and_bearer_off_runpod(settings: Settings, speech: SpeechService) -> None:
    running = keyed(settings, speech)
    try:
        url = f"{running.url}/v1/audio/voices"
        assert httpx.get(url, headers={"X-API-Key": KEY}).status_code == 200
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        wrong = httpx.get(url, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401
        assert "X-API-Key" in wrong.json()["error"]["message"]
    finally:
        running.stop()


def test_behind_runpods_gateway_the_key_goes_in_x_api_key(
    settings: Settings, speech: SpeechService
) -> None:
    """RunPod's gateway takes `Authorization: Bearer RUNPOD_API_KEY`; the worker's own key
    then travels in X-API-Key, which the openai SDK sends as a default header."""
    running = keyed(settings, speech, runpod_endpoint_id="ep123")
    try:
        bearer = httpx.get(f"{running.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 401
        assert "Bearer" not in bearer.json()["error"]["message"]
        client = openai.OpenAI(
            base_url=f"{running.url}/v1",
            api_key="rp_the_runpod_key",  # what the gateway checks
            default_headers={"X-API-Key": KEY},
            max_retries=0,
            timeout=60,
        )
        data = client.audio.speech.create(
            model="tts-1", voice="alloy", input="Hi.", response_format="wav",
            extra_body={"seed": 1, "max_new_tokens": 30},
        ).content  # fmt: skip
        assert audio.decode(data, 24_000).duration_s > 0.5
        without = openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            without.models.list()
    finally:
        running.stop()


def test_bearer_can_be_switched_off(settings: Settings, speech: SpeechService) -> None:
    running = keyed(settings, speech, http_bearer_auth="off")
    try:
        url = f"{running.url}/v1/models"
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
        assert httpx.get(url, headers={"X-API-Key": KEY}).status_code == 200
    finally:
        running.stop()


def test_no_key_is_refused_off_loopback_unless_allowed(settings: Settings) -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost.example"):
        assert "HTTP_ALLOW_NO_KEY" in (listen_refusal(settings, host) or "")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert listen_refusal(settings, host) is None
    allowed = settings.model_copy(update={"http_allow_no_key": True})
    assert listen_refusal(allowed, "0.0.0.0") is None
    keyed_settings = load_settings({"HIGGS_API_KEY": KEY})
    assert listen_refusal(keyed_settings, "0.0.0.0") is None
    assert load_settings({"HIGGS_API_KEY": " "}).higgs_api_key is None  # an unset secret


def test_cli_refuses_to_start_off_loopback_without_a_key(base_env: dict[str, str]) -> None:
    drop = ("HIGGS_API_KEY", "HTTP_ALLOW_NO_KEY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    result = subprocess.run(
        [sys.executable, "-m", "higgs_runpod.tools.cli", "http", "--host", "0.0.0.0",
         "--port", str(free_port())],
        env={**env, **base_env}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "cannot start: HIGGS_API_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


# --- leaks ------------------------------------------------------------------------------------


def test_a_load_failure_does_not_show_the_checkpoint_path(
    settings: Settings, tmp_path: Path
) -> None:
    missing = tmp_path / "secret-checkpoint-dir"
    broken = settings.model_copy(update={"model_path": missing, "lazy_load": True})
    running = serve(broken, SpeechService(broken))
    try:
        response = httpx.post(f"{running.url}/v1/audio/speech", json=speech(), timeout=60)
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert str(tmp_path) not in response.text and "secret-checkpoint" not in response.text
        assert "/" not in response.json()["error"]["message"]
    finally:
        running.stop()
