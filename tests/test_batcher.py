"""Batched generation on the tiny checkpoint (float32, CPU): every job gets its own result.

Greedy decoding with RAS off is deterministic, so a job's codes in a batch must equal its
codes when run alone; anything leaking between rows (padding, aligners, callbacks) shows.
"""

from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
import soundfile
import torch

from conftest import make_wav
from higgs_runpod.batcher import Batcher, batch_key
from higgs_runpod.engine import Engine, Job, SamplingParams, Synthesis
from higgs_runpod.handler import Worker
from higgs_runpod.prompts import build_conversation
from higgs_runpod.settings import load_settings
from higgs_runpod.voices import ReferenceClip

GREEDY = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=24)
TEXTS = ["Hi.", "Hello, world! How are you today?", "The quick brown fox jumps over the dog."]


def _clip(seconds: float, freq: float) -> ReferenceClip:
    samples, _ = soundfile.read(io.BytesIO(make_wav(seconds, freq=freq)), dtype="float32")
    return ReferenceClip(samples, "Hello there.")


def _alone(engine: Engine, job: Job) -> Synthesis:
    result = engine.synthesize_batch([job])[0]
    assert isinstance(result, Synthesis)
    return result


def _ok(results: list) -> list[Synthesis]:
    assert all(isinstance(r, Synthesis) for r in results), results
    return results


def test_greedy_batch_equals_each_job_alone(engine: Engine) -> None:
    jobs = [Job(build_conversation(text), GREEDY, decode=False) for text in TEXTS]
    batched = _ok(engine.synthesize_batch(jobs))
    for job, result in zip(jobs, batched, strict=True):
        alone = _alone(engine, job)
        assert torch.equal(result.codes, alone.codes)
        assert (result.prompt_tokens, result.generated_tokens) == (
            alone.prompt_tokens,
            alone.generated_tokens,
        )
    assert not torch.equal(batched[0].codes, batched[1].codes)  # the rows really differ


def test_cloned_voices_of_different_lengths_batch_correctly(engine: Engine) -> None:
    voices = [_clip(0.8, 220.0), _clip(1.6, 330.0), _clip(1.2, 440.0)]
    jobs = [
        Job(build_conversation(text, voice=voice), GREEDY, decode=False)
        for text, voice in zip(TEXTS, voices, strict=True)
    ]
    for job, result in zip(jobs, _ok(engine.synthesize_batch(jobs)), strict=True):
        assert torch.equal(result.codes, _alone(engine, job).codes)


def test_a_bad_prompt_fails_alone(engine: Engine) -> None:
    bad = [
        {"role": "user", "content": [{"type": "audio"}]}
    ]  # a clip with neither samples nor codes
    jobs = [Job(build_conversation(TEXTS[0]), GREEDY), Job(bad, GREEDY), Job(build_conversation(TEXTS[1]), GREEDY)]  # fmt: skip
    first, failed, last = engine.synthesize_batch(jobs)
    assert isinstance(failed, Exception)
    assert torch.equal(first.codes, _alone(engine, jobs[0]).codes)
    assert torch.equal(last.codes, _alone(engine, jobs[2]).codes)


def test_a_job_that_breaks_generate_fails_alone(engine: Engine) -> None:
    """Codes outside the vocabulary pass the prompt builder but break the batched forward;
    the batch is then run job by job and only that job fails."""
    codebooks = engine.model.config.num_codebooks
    broken = torch.full((5, codebooks), 10_000, dtype=torch.long)
    good = [build_conversation(t, voice=_clip(1.0, 220.0)) for t in TEXTS[:2]]
    bad = build_conversation(TEXTS[2], history=[("Before.", broken)])
    jobs = [Job(good[0], GREEDY), Job(bad, GREEDY), Job(good[1], GREEDY)]
    first, failed, last = engine.synthesize_batch(jobs)
    assert isinstance(failed, Exception)
    assert isinstance(first, Synthesis) and isinstance(last, Synthesis)
    assert torch.equal(last.codes, _alone(engine, jobs[2]).codes)


def test_cancelling_one_row_leaves_the_others_running(engine: Engine) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def stop_after_first(frames: torch.Tensor) -> None:
        seen.append(frames.shape[0])
        cancel.set()

    cancelled = Job(build_conversation(TEXTS[0]), GREEDY, cancel, stop_after_first, False)
    other = Job(build_conversation(TEXTS[1]), GREEDY, threading.Event(), decode=False)
    stopped, finished = _ok(engine.synthesize_batch([cancelled, other]))
    assert stopped.frames == sum(seen) < finished.frames
    assert torch.equal(finished.codes, _alone(engine, other).codes)


def test_frames_reach_their_own_callback(engine: Engine) -> None:
    received: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    jobs = [
        Job(build_conversation(text), GREEDY, on_frames=received[i].append, decode=False)
        for i, text in enumerate(TEXTS[:2])
    ]
    for i, result in enumerate(_ok(engine.synthesize_batch(jobs))):
        assert torch.equal(torch.cat(received[i]), result.codes)


def test_concurrent_calls_share_a_batch(engine: Engine) -> None:
    sizes: list[int] = []

    def run_batch(jobs: list[Job]) -> list:
        sizes.append(len(jobs))
        return engine.synthesize_batch(jobs)

    batcher = Batcher(run_batch, window_ms=500, max_batch_size=3)
    jobs = [Job(build_conversation(text), GREEDY, decode=False) for text in TEXTS]
    results: dict[int, Synthesis] = {}

    def submit(index: int) -> None:
        results[index] = batcher.submit(jobs[index])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sizes == [3]
    for index, job in enumerate(jobs):
        assert torch.equal(results[index].codes, _alone(engine, job).codes)


def test_batcher_delivers_errors_to_their_own_caller(engine: Engine) -> None:
    batcher = Batcher(engine.synthesize_batch, window_ms=300, max_batch_size=2)
    bad = [{"role": "user", "content": [{"type": "audio"}]}]
    outcome: dict[str, object] = {}

    def submit(name: str, conversation: list) -> None:
        try:
            outcome[name] = batcher.submit(Job(conversation, GREEDY, decode=False))
        except Exception as error:
            outcome[name] = error

    threads = [
        threading.Thread(target=submit, args=("good", build_conversation(TEXTS[0]))),
        threading.Thread(target=submit, args=("bad", bad)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(outcome["good"], Synthesis) and isinstance(outcome["bad"], Exception)


def test_grouping_rules() -> None:
    plain = build_conversation("Hi")
    cloned = build_conversation("Hi", voice=ReferenceClip(np.zeros(24_000, np.float32), "x"))
    assert batch_key(Job(plain, GREEDY)) == batch_key(Job(plain, GREEDY))
    assert batch_key(Job(plain, GREEDY)) != batch_key(Job(cloned, GREEDY))
    hotter = SamplingParams(temperature=0.9, max_new_tokens=24)
    assert batch_key(Job(plain, GREEDY)) != batch_key(Job(plain, hotter))
    seeded = SamplingParams(temperature=0.9, max_new_tokens=24, seed=5)
    assert batch_key(Job(plain, seeded)) != batch_key(Job(plain, seeded))  # seeded: alone


def test_concurrent_handler_jobs_share_a_batch_and_get_their_own_audio(
    base_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unseeded jobs through Worker.handle at once: one batch, each job its own audio."""
    worker = Worker(load_settings({**base_env, "BATCH_WINDOW_MS": "1000", "MAX_BATCH_SIZE": "3"}))
    worker.engine.load()
    sizes: list[int] = []
    real = worker.engine.synthesize_batch

    def spy(jobs: list[Job]) -> list:
        sizes.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(worker.engine, "synthesize_batch", spy)
    inputs = [{"text": t, "temperature": 0, "ras_win_len": 0, "max_new_tokens": 24} for t in TEXTS]

    async def together() -> list[dict]:
        jobs = [worker.handle({"id": f"j{i}", "input": x}) for i, x in enumerate(inputs)]
        return await asyncio.gather(*jobs)

    outputs = asyncio.run(together())
    assert sizes == [3]
    for job_input, output in zip(inputs, outputs, strict=True):
        alone = asyncio.run(worker.handle({"id": "solo", "input": job_input}))
        assert output["audio_base64"] == alone["audio_base64"]


def test_synthesize_goes_through_the_batcher(engine: Engine) -> None:
    assert engine._batcher is not None  # MAX_BATCH_SIZE defaults to 8
    job = Job(build_conversation(TEXTS[0]), GREEDY, decode=False)
    through = engine.synthesize(job.conversation, GREEDY, decode=False)
    assert torch.equal(through.codes, _alone(engine, job).codes)


def test_a_streaming_job_in_a_failed_batch_is_not_run_twice(engine: Engine) -> None:
    """Frames already streamed cannot be taken back, so it fails with the batch's error."""
    codebooks = engine.model.config.num_codebooks
    broken = torch.full((5, codebooks), 10_000, dtype=torch.long)
    received: list[torch.Tensor] = []
    streaming = Job(build_conversation(TEXTS[0], voice=_clip(1.0, 220.0)), GREEDY, None, received.append)  # fmt: skip
    bad = Job(build_conversation(TEXTS[2], history=[("Before.", broken)]), GREEDY)
    other = Job(build_conversation(TEXTS[1], voice=_clip(1.0, 330.0)), GREEDY)
    streamed, failed, rerun = engine.synthesize_batch([streaming, bad, other])
    assert isinstance(streamed, Exception) and isinstance(failed, Exception)
    assert isinstance(rerun, Synthesis)
