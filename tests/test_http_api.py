"""The HTTP app in-process (httpx's ASGI transport) on the real tiny model.

The end-to-end tests over a real socket with the official `openai` client are in
test_http_openai_client.py; these cover what is easier to set up in-process: auth off,
/ping while loading and after a failed load, body limits, saturation (429), and an
internal error (the only fault injected: an engine that raises, since a real one has no
reliable way to fail).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.fronts.http_state import Service
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio
from higgs_runpod.synthesis.engine import Engine


def service_of(app: Any) -> Service:
    return app.app.state.service


def call(app: Any, run: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await run(client)

    return asyncio.run(main())


def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    return call(app, lambda client: client.get(path, **kwargs))


def post(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    return call(app, lambda client: client.post(path, timeout=120, **kwargs))


JSON_TYPE = {"Content-Type": "application/json"}


def metric(app: Any, name: str) -> float:
    """One unlabelled sample of /metrics."""
    line = next(x for x in get(app, "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def speech_body(**fields: Any) -> dict[str, Any]:
    return {"model": "higgs-audio-v2", "input": "Hello.", "max_new_tokens": 40, **fields}


def test_auth_off_every_route_answers(settings: Settings, speech: SpeechService) -> None:
    app = create_app(settings, speech)
    assert get(app, "/ping").status_code == 200
    assert get(app, "/v1/models").json()["data"][0]["id"] == "higgs-audio-v2"
    assert "alice" in [v["id"] for v in get(app, "/v1/audio/voices").json()["voices"]]
    assert "higgs_model_loaded 1.0" in get(app, "/metrics").text
    response = post(app, "/v1/audio/speech", json=speech_body(response_format="wav", seed=4))
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert response.headers["x-seed"] == "4"
    assert audio.decode(response.content, 24_000).duration_s > 0.5
    assert metric(app, "higgs_prompt_cache_tokens") > 0
    reused = metric(app, "higgs_prompt_cache_reused_tokens")
    assert post(app, "/v1/audio/speech", json=speech_body(seed=5)).status_code == 200
    assert metric(app, "higgs_prompt_cache_reused_tokens") > reused  # the same prompt again


def test_playground_page_is_self_contained(settings: Settings, speech: SpeechService) -> None:
    page = get(create_app(settings, speech), "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'fetch("v1/audio/speech"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no build


def ping_until(app: Any, wanted: int, timeout: float) -> list[int]:
    """Start loading as the app's lifespan does, then poll /ping; returns the codes seen."""

    async def run(client: httpx.AsyncClient) -> list[int]:
        service_of(app).start_loading()
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1] != wanted:
            assert time.monotonic() < deadline, f"/ping never said {wanted}: {seen[-5:]}"
            seen.append((await client.get("/ping")).status_code)
            await asyncio.sleep(0.05)
        return seen

    return call(app, run)


def test_ping_is_204_while_loading_then_200(settings: Settings) -> None:
    app = create_app(settings, SpeechService(settings))  # a fresh engine, not loaded yet
    assert get(app, "/ping").status_code == 204
    assert set(ping_until(app, 200, timeout=60)) <= {204, 200}


def test_ping_is_500_when_the_model_cannot_load(settings: Settings, tmp_path: Path) -> None:
    broken = settings.model_copy(update={"model_path": tmp_path / "missing"})
    app = create_app(broken, SpeechService(broken))
    assert set(ping_until(app, 500, timeout=30)) <= {204, 500}


def test_lazy_load_is_ready_at_once(settings: Settings) -> None:
    lazy = settings.model_copy(update={"lazy_load": True})
    assert get(create_app(lazy, SpeechService(lazy)), "/ping").status_code == 200


def test_body_over_the_limit_is_413(settings: Settings, speech: SpeechService) -> None:
    small = settings.model_copy(update={"http_max_body_bytes": 2048})
    app = create_app(small, speech)
    response = post(app, "/v1/audio/speech", json=speech_body(input="x" * 3000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"

    async def chunked(client: httpx.AsyncClient) -> httpx.Response:
        async def pieces() -> Any:  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1024

        return await client.post("/v1/audio/speech", content=pieces(), headers=JSON_TYPE)

    assert call(app, chunked).status_code == 413


def test_body_that_is_not_json_is_400(settings: Settings, speech: SpeechService) -> None:
    app = create_app(settings, speech)
    response = post(app, "/v1/audio/speech", content=b"{nope", headers=JSON_TYPE)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_uses_the_openai_error_shape(
    settings: Settings, speech: SpeechService
) -> None:
    response = get(create_app(settings, speech), "/v1/chat/completions")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_saturated_worker_answers_429(settings: Settings, speech: SpeechService) -> None:
    one = settings.model_copy(update={"http_max_in_flight": 1})
    app = create_app(one, speech)

    async def run(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        long = asyncio.create_task(
            client.post("/v1/audio/speech", json=speech_body(max_new_tokens=250), timeout=120)
        )
        while service_of(app).in_flight == 0:
            await asyncio.sleep(0.01)
        second = await client.post("/v1/audio/speech", json=speech_body())
        return await long, second

    first, second = call(app, run)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert service_of(app).in_flight == 0
    assert "higgs_speech_rejected_total 1.0" in get(app, "/metrics").text


class _FailingEngine(Engine):
    """Fault injection: an engine whose generation raises, with internals in the message."""

    def synthesize(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail at /opt/internal/path")


def test_internal_error_is_500_without_internals(settings: Settings, engine: Engine) -> None:
    failing = _FailingEngine(settings)
    failing.model, failing.processor = engine.model, engine.processor
    app = create_app(settings, SpeechService(settings, failing))
    response = post(app, "/v1/audio/speech", json=speech_body())
    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"
    assert "secret" not in response.text and "/opt" not in response.text
    assert service_of(app).in_flight == 0  # the admission was given back
    assert get(app, "/ping").status_code == 200  # and the worker keeps serving


def test_speed_stretches_the_audio(settings: Settings, speech: SpeechService) -> None:
    app = create_app(settings, speech)
    lengths = {}
    for speed in (1.0, 2.0, 0.5):
        response = post(
            app, "/v1/audio/speech", json=speech_body(response_format="pcm", seed=9, speed=speed)
        )
        assert response.status_code == 200
        lengths[speed] = len(np.frombuffer(response.content, dtype="<i2"))
    assert lengths[2.0] / lengths[1.0] == pytest.approx(0.5, rel=0.05)
    assert lengths[0.5] / lengths[1.0] == pytest.approx(2.0, rel=0.05)
