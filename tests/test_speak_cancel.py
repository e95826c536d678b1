"""`SpeechService.speak(request, cancel=event)`: setting the event stops generation at the
next decode step (the real tiny model), which is how an HTTP client that disconnects frees
the engine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from higgs_runpod.errors import GenerationCancelled
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.request.schema import parse_request
from higgs_runpod.settings import Settings


def test_cancel_stops_a_long_generation(worker: Worker, settings: Settings) -> None:
    request = parse_request({"text": "On and on.", "seed": 1, "max_new_tokens": 2048}, settings)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.perf_counter()
    with pytest.raises(GenerationCancelled, match="decode steps"):
        asyncio.run(worker.service.speak(request, cancel=cancel))
    assert time.perf_counter() - started < 15.0  # all 2048 steps take ~40 s on this CPU


def test_without_cancel_speak_is_unchanged(worker: Worker, settings: Settings) -> None:
    request = parse_request({"text": "Hi.", "seed": 2, "max_new_tokens": 30}, settings)
    speech = asyncio.run(worker.service.speak(request, cancel=threading.Event()))
    assert speech.duration_s > 0
