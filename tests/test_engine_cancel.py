"""Setting the cancel event stops generation at the next decode step (the real tiny model)."""

from __future__ import annotations

import threading
import time

import pytest

from higgs_runpod.engine import Engine, SamplingParams
from higgs_runpod.errors import GenerationCancelled
from higgs_runpod.prompts import build_conversation


def test_cancel_stops_a_long_generation(engine: Engine) -> None:
    conversation = build_conversation("A sentence that could go on for a long time.")
    params = SamplingParams(seed=1, max_new_tokens=2048)  # ~40 s of decoding on this CPU
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.perf_counter()
    with pytest.raises(GenerationCancelled, match="decode steps"):
        engine.synthesize(conversation, params, cancel)
    assert time.perf_counter() - started < 10.0


def test_cancelled_before_start_does_not_generate(engine: Engine) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(GenerationCancelled, match="before generation"):
        engine.synthesize(build_conversation("Hi."), SamplingParams(max_new_tokens=10), cancel)


def test_without_cancel_the_engine_still_generates(engine: Engine) -> None:
    result = engine.synthesize(build_conversation("Hi."), SamplingParams(seed=2, max_new_tokens=30))
    assert result.generated_tokens > 0
