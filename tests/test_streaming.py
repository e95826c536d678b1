"""Streaming: steps to frames, frames to pieces, pieces that join into the whole."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
import pytest
import torch

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.request.schema import parse_request
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.synthesis.streaming import DelayAligner, PieceDecoder

BOS, EOS = 16, 17


def delayed_steps(codes: torch.Tensor) -> list[torch.Tensor]:
    """Codes (frames x codebooks) as the model emits them: BOS step, delayed body, EOS step."""
    frames, codebooks = codes.shape
    steps = torch.full((frames + codebooks - 1, codebooks), EOS)
    for i in range(codebooks):
        steps[:i, i] = BOS
        steps[i : i + frames, i] = codes[:, i]
    return [torch.full((codebooks,), BOS), *steps, torch.full((codebooks,), EOS)]


def test_aligner_completes_a_frame_when_the_last_codebook_has_it() -> None:
    codes = torch.randint(0, 16, (10, 4))
    aligner = DelayAligner(BOS, EOS)
    out = [aligner.push(step) for step in delayed_steps(codes)]
    assert [len(frames) for frames in out] == [0, 0, 0, 0] + [1] * 10 + [0]
    assert torch.equal(torch.cat(out), codes)
    assert aligner.finished


@pytest.mark.parametrize("piece", [1, 3, 7, 25])
def test_pieces_join_into_the_one_shot_decode(engine: Engine, piece: int) -> None:
    codes = torch.randint(0, 16, (60, 4), generator=torch.Generator().manual_seed(piece))
    whole = engine.decode_codes(codes)
    decoder = PieceDecoder(engine.decode_codes, engine.decoder_context_frames, 960)
    pieces = []
    for frame in codes.split(2):
        decoder.push(frame)
        while decoder.ready() >= piece:
            pieces.append(decoder.take(piece))
    pieces.append(decoder.take(final=True))
    assert 0 < engine.decoder_context_frames < 30
    assert np.max(np.abs(np.concatenate(pieces) - whole)) < 1e-6


def collect(worker: Worker, job_input: dict[str, Any]) -> tuple[list[dict], list[float]]:
    """A stream job's outputs as RunPod gets them, and when each came."""

    async def run() -> tuple[list[dict], list[float]]:
        items, times, start = [], [], time.perf_counter()
        async for item in worker.handle_stream({"id": "s", "input": job_input}):
            items.append(item)
            times.append(time.perf_counter() - start)
        return items, times

    return asyncio.run(run())


def test_stream_joins_into_the_non_streamed_audio(worker: Worker) -> None:
    job = {
        "text": "Streaming test. Second sentence here.",
        "seed": 4,
        "max_new_tokens": 80,
        "format": "pcm",
    }
    items, times = collect(worker, {**job, "stream": True})
    *pieces, summary = items
    whole = asyncio.run(worker.service.speak(parse_request(job, worker.settings)))
    streamed = b"".join(base64.b64decode(p["audio_base64"]) for p in pieces)
    difference = np.frombuffer(streamed, "<i2").astype(int) - np.frombuffer(whole.audio, "<i2")
    assert np.abs(difference).max() == 0  # decoded in the same pieces, encoded alike
    assert pieces[0]["frames"] == worker.settings.stream_first_frames
    assert all(p["frames"] <= worker.settings.stream_piece_frames for p in pieces[1:])
    assert summary["done"] and summary["pieces"] == len(pieces)
    assert summary["usage"]["audio_frames"] == sum(p["frames"] for p in pieces)
    assert summary["timings_ms"]["first_audio"] < summary["timings_ms"]["total"]
    assert times[0] < times[-1]


def test_cancelled_job_stops_generating_and_the_next_job_runs(worker: Worker) -> None:
    long_text = " ".join(f"Sentence number {i} is here." for i in range(60))
    job = {
        "id": "long",
        "input": {"text": long_text, "chunking": {"method": "word", "max_words": 10}},
    }

    async def run() -> float:
        task = asyncio.ensure_future(worker.handle(job))
        await asyncio.sleep(1.0)
        assert not task.done()
        task.cancel()
        cancelled_at = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cancelled_at

    cancelled_at = asyncio.run(run())
    while worker.service.engine.running and time.perf_counter() - cancelled_at < 2.0:
        time.sleep(0.01)
    assert worker.service.engine.running == 0, "generation did not stop"
    output = asyncio.run(
        worker.handle({"id": "next", "input": {"text": "Next.", "max_new_tokens": 10}})
    )
    assert output["usage"]["generated_tokens"] == 10


def test_progress_counts_chunks_and_frames(worker: Worker) -> None:
    reports: list[dict] = []
    job = {
        "text": "A b c d e f g h i j k. L m.",
        "max_new_tokens": 15,
        "chunking": {"method": "word", "max_words": 10},
    }
    asyncio.run(worker.service.speak(parse_request(job, worker.settings), progress=reports.append))
    assert reports[0] == {"chunk": 1, "chunks": 2, "frames": 0}
    assert reports[-1]["chunk"] == 2
