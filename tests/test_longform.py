"""Long texts generated chunk by chunk with context, on the tiny model."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
import torch

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.request.schema import parse_request
from higgs_runpod.synthesis.audio import decode
from higgs_runpod.synthesis.engine import Engine

SENTENCES = [
    "One two three four five six.",
    "Seven eight nine ten eleven twelve.",
    "Thirteen fourteen fifteen sixteen seventeen eighteen.",
]
TEXT = " ".join(SENTENCES)
SPANS = [(TEXT.index(s), TEXT.index(s) + len(s)) for s in SENTENCES]


class Spy:
    """Delegates to the real engine and keeps each conversation it was given."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conversations: list[list[dict[str, Any]]] = []
        self.results: list[Any] = []

    def __call__(self, conversation: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        self.conversations.append(conversation)
        result = self.real(conversation, *args, **kwargs)
        self.results.append(result)
        return result


def speak(worker: Worker, **fields: Any) -> Any:
    request = parse_request(
        {"text": TEXT, "seed": 11, "max_new_tokens": 20, **fields}, worker.settings
    )
    return asyncio.run(worker.service.speak(request))


@pytest.fixture()
def spy(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> Spy:
    recorder = Spy(worker.service.engine)
    recorder.real = worker.service.engine.synthesize
    monkeypatch.setattr(worker.service.engine, "synthesize", recorder)
    return recorder


def context_codes(conversation: list[dict[str, Any]]) -> list[torch.Tensor]:
    return [item["codes"] for m in conversation for item in m["content"] if "codes" in item]


def test_word_chunks_carry_the_last_k_chunks_as_codes(worker: Worker, spy: Spy) -> None:
    speech = speak(worker, chunking={"method": "word", "max_words": 10, "context_chunks": 1})
    assert [(c.start, c.end) for c in speech.synthesis.chunks] == SPANS
    assert [len(context_codes(c)) for c in spy.conversations] == [0, 1, 1]
    for k in (1, 2):  # chunk k hears exactly chunk k-1's codes
        assert torch.equal(context_codes(spy.conversations[k])[0], spy.results[k - 1].codes)
        user_texts = [m["content"][0]["text"] for m in spy.conversations[k] if m["role"] == "user"]
        assert (
            user_texts[-2]
            == TEXT[speech.synthesis.chunks[k - 1].start : speech.synthesis.chunks[k - 1].end]
        )


def test_context_chunks_bounds_the_history(worker: Worker, spy: Spy) -> None:
    speak(worker, chunking={"method": "word", "max_words": 10, "context_chunks": 2})
    assert [len(context_codes(c)) for c in spy.conversations] == [0, 1, 2]
    speak(worker, chunking={"method": "word", "max_words": 10, "context_chunks": 0})
    assert [len(context_codes(c)) for c in spy.conversations[3:]] == [0, 0, 0]


def test_every_chunk_uses_the_same_seed(worker: Worker, spy: Spy) -> None:
    speak(worker, chunking={"method": "word", "max_words": 10})
    assert [result.seed for result in spy.results] == [11, 11, 11]


def test_joined_audio_is_the_sum_of_the_chunks_and_deterministic(worker: Worker) -> None:
    options = {"chunking": {"method": "word", "max_words": 10}}
    first, again = speak(worker, **options), speak(worker, **options)
    frames = [chunk.frames for chunk in first.synthesis.chunks]
    assert len(frames) == 3
    assert first.synthesis.frames == sum(frames)
    clip = decode(first.audio, 24_000)
    assert clip.duration_s == pytest.approx(sum(frames) * 0.04)
    assert first.audio == again.audio
    assert torch.equal(first.synthesis.codes, again.synthesis.codes)


def test_speaker_chunks_in_the_response(worker: Worker) -> None:
    text = "[SPEAKER0] Hello there. [SPEAKER1] Hi! [SPEAKER0] Bye."
    output = asyncio.run(
        worker.handle(
            {
                "id": "j",
                "input": {"text": text, "max_new_tokens": 12, "chunking": {"method": "speaker"}},
            }
        )
    )
    assert [(c["text_start"], c["text_end"]) for c in output["chunks"]] == [
        (0, 23),
        (24, 38),
        (39, 54),
    ]
    assert sum(c["frames"] for c in output["chunks"]) == output["usage"]["audio_frames"]
    assert len(base64.b64decode(output["audio_base64"])) > 44
