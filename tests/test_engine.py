"""The engine on the real transformers classes, with the tiny checkpoint on the CPU."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from higgs_runpod.errors import OutOfMemoryError, RequestError
from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.request.voices import ReferenceClip
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.synthesis.loading import resolve_device
from support.engine import ForwardSpy, Staggered, admitted_together

# RAS resamples repeated codes at random even when greedy, so greedy runs switch it off.
GREEDY = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=30)


def test_loaded_from_the_checkpoint_directories(engine: Engine) -> None:
    assert engine.is_loaded
    assert (engine.device.type, engine.dtype) == ("cpu", torch.float32)
    assert type(engine.model).__name__ == "HiggsAudioV2ForConditionalGeneration"
    assert engine.model.config._attn_implementation == "sdpa"
    assert engine.sample_rate == 24_000
    assert engine.frame_rate == 25.0
    assert (engine.slots, engine.context) == (8, 4096)  # MAX_BATCH_SIZE, MAX_CONTEXT_TOKENS
    assert not engine.cuda_graphs
    # Cached codes are checked against this model's codebooks and its tokenizer's codes.
    assert engine.voice_cache is not None and engine.voice_cache.shape is not None
    assert engine.voice_cache.shape.codebooks == engine.model.config.num_codebooks
    assert engine.voice_cache.shape.codebook_size == engine.model.config.codebook_size - 2


def test_auto_device_without_gpu() -> None:
    assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_frames_and_samples_agree(engine: Engine) -> None:
    result = engine.synthesize(build_conversation("Hello there"), GREEDY)
    codebooks = engine.model.config.num_codebooks
    # The tiny model never ends on its own: every step is used; one all-BOS step opens
    # the stream and the delay pattern costs codebooks - 1 steps.
    assert result.generated_tokens == 30
    assert result.frames == 30 - 1 - (codebooks - 1)
    assert result.codes.shape == (result.frames, codebooks)
    assert len(engine.decode_codes(result.codes)) == result.frames * 960
    assert result.prompt_tokens > 10


def test_greedy_is_deterministic(engine: Engine) -> None:
    first = engine.synthesize(build_conversation("Same text"), GREEDY)
    second = engine.synthesize(build_conversation("Same text"), GREEDY)
    assert torch.equal(first.codes, second.codes)


def test_seed_reproduces_sampling(engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=30)
    first = engine.synthesize(build_conversation("Seeded"), params)
    again = engine.synthesize(build_conversation("Seeded"), params)
    other = engine.synthesize(
        build_conversation("Seeded"), SamplingParams(temperature=1.0, seed=8, max_new_tokens=30)
    )
    assert first.seed == 7
    assert torch.equal(first.codes, again.codes)
    assert not torch.equal(first.codes, other.codes)


def test_unseeded_requests_report_their_seed(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=20)
    first = engine.synthesize(build_conversation("Hi"), params)
    replay = engine.synthesize(
        build_conversation("Hi"), SamplingParams(max_new_tokens=20, seed=first.seed)
    )
    assert torch.equal(first.codes, replay.codes)


def test_ras_can_be_switched_off(engine: Engine) -> None:
    params = SamplingParams(ras_win_len=0, max_new_tokens=20)
    assert engine.synthesize(build_conversation("Hum"), params).frames > 0


def test_one_step_yields_no_frame(engine: Engine) -> None:
    result = engine.synthesize(build_conversation("Hi"), SamplingParams(max_new_tokens=1))
    samples = engine.decode_codes(result.codes)
    assert (result.generated_tokens, result.frames, len(samples)) == (1, 0, 0)


def test_a_prompt_longer_than_a_slot_is_refused(base_env: dict[str, str]) -> None:
    small = Engine(load_settings({**base_env, "MAX_CONTEXT_TOKENS": "64"}))
    with pytest.raises(RequestError, match=r"max_new_tokens: .*64 tokens.*MAX_CONTEXT_TOKENS"):
        small.synthesize(build_conversation("Hello there, how are you?"), GREEDY)
    short = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=5)
    assert small.synthesize(build_conversation("Hi"), short).generated_tokens == 5


def test_slots_follow_the_kv_cache_budget(base_env: dict[str, str]) -> None:
    budget = {**base_env, "MAX_CONTEXT_TOKENS": "256", "MAX_BATCH_SIZE": "8"}
    engine = Engine(load_settings({**budget, "KV_CACHE_TOKENS": "600"}))
    engine.load()
    assert engine.slots == 2  # 600 tokens hold two 256-token contexts
    assert engine.prompt_cache.max_tokens == 88  # the prompt cache takes what they leave
    with pytest.raises(Exception, match=r"cannot hold one 256-token context"):
        Engine(load_settings({**budget, "KV_CACHE_TOKENS": "100"})).load()


def test_out_of_memory_in_prefill_fails_cleanly_and_recovers(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the model's forward is replaced to raise the CUDA OOM error a GPU would."""

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "forward", out_of_memory)
        with pytest.raises(OutOfMemoryError, match="ran out of memory"):
            engine.synthesize(build_conversation("Hi"), GREEDY)
    assert engine.synthesize(build_conversation("Hi"), GREEDY).frames > 0


def test_calls_from_many_threads_all_finish(engine: Engine) -> None:
    results: dict[int, int] = {}

    def run(index: int) -> None:
        params = SamplingParams(seed=index, max_new_tokens=10 + index)
        results[index] = engine.synthesize(build_conversation(f"Text {index}"), params).frames

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]  # > 8 slots
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == list(range(12))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, ras_win_len=7,
                         ras_win_max_num_repeat=2, max_new_tokens=40)  # fmt: skip


def test_a_seeded_request_draws_the_same_codes_alone_and_among_seven_others(
    engine: Engine,
) -> None:
    target = SamplingParams(**{**SAMPLED.__dict__, "seed": 4242})
    text = build_conversation("The same words, sampled.")
    alone = engine.synthesize(text, target)
    runs = Staggered()
    for index, at in enumerate([0, 2, 4, 7, 11, 16, 22]):  # the target joins at 9
        params = SamplingParams(**{**SAMPLED.__dict__, "seed": index,
                                   "temperature": 0.8 if index % 2 else 1.0,
                                   "max_new_tokens": 30 + 7 * index})  # fmt: skip
        conversation = build_conversation(f"Another request, number {index}.")
        runs.start(f"other {index}", at, lambda c=conversation, p=params: engine.synthesize(
            c, p, on_frames=runs.count))  # fmt: skip
    runs.start("target", 9, lambda: engine.synthesize(text, target))
    results = runs.join()
    assert len(results) == 8 and not [r for r in results.values() if isinstance(r, Exception)]
    assert torch.equal(results["target"].codes, alone.codes)  # type: ignore[attr-defined]


def test_a_seeded_request_prefilled_with_seven_others_draws_the_codes_it_draws_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = SamplingParams(**{**SAMPLED.__dict__, "seed": 4242})
    text = build_conversation("The same words, sampled.")
    alone = engine.synthesize(text, target)
    calls = [lambda: engine.synthesize(text, target)]
    for index in range(7):
        params = SamplingParams(**{**SAMPLED.__dict__, "seed": index,
                                   "max_new_tokens": 20 + 5 * index})  # fmt: skip
        conversation = build_conversation(f"Another request, number {index}.")
        calls.append(lambda c=conversation, p=params: engine.synthesize(c, p))
    spy = ForwardSpy(engine, monkeypatch)
    results = admitted_together(engine, calls)
    assert max(spy.batches) > 1  # some of them shared a forward
    assert not [r for r in results if isinstance(r, Exception)]
    assert torch.equal(results[0].codes, alone.codes)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "error",
    [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("a batch the forward refused")],
)  # fmt: skip
def test_a_batched_prefill_that_fails_is_tried_one_request_at_a_time(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """No GPU here: the forward raises CUDA's error (or another) for any batch of more
    than one row, as a GPU short of memory for the batch, not for one prompt, would."""
    conversations = [build_conversation(f"Out of memory, number {n}.") for n in range(4)]
    alone = [engine.synthesize(c, GREEDY).codes for c in conversations]
    forward = engine.model.forward
    batches: list[int] = []

    def short_of_memory(*args: object, **kwargs: torch.Tensor) -> object:
        batches.append(int(kwargs["input_ids"].shape[0]))
        if batches[-1] > 1:
            raise error
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", short_of_memory)
    calls = [lambda c=c: engine.synthesize(c, GREEDY) for c in conversations]
    results = admitted_together(engine, calls)
    assert batches == [4, 1, 1, 1, 1]
    for result, codes in zip(results, alone, strict=True):
        assert torch.equal(result.codes, codes)  # type: ignore[attr-defined]


def test_two_hundred_short_jobs_with_cancellations_free_every_slot_and_keep_memory_flat(
    engine: Engine,
) -> None:
    """Jobs from 8 threads; every third is cancelled, before it starts or while it runs."""

    steps: dict[int, int] = {}

    def job(index: int) -> None:
        cancel = threading.Event()
        if index % 6 == 0:
            cancel.set()  # cancelled while waiting for a slot
        frames = (lambda f: cancel.set()) if index % 6 == 3 else None  # cancelled running
        params = SamplingParams(seed=index, max_new_tokens=12 + index % 9)
        steps[index] = engine.synthesize(build_conversation(f"Job {index}"), params,
                                         cancel=cancel, on_frames=frames).generated_tokens  # fmt: skip

    def batch(indices: range) -> None:
        threads = [threading.Thread(target=lambda i=i: [job(j) for j in range(i, indices.stop, 8)])
                   for i in range(indices.start, indices.start + 8)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)

    batch(range(0, 40))  # warm-up: allocator pools and kernels settle
    before = _rss_mb()
    batch(range(40, 200))
    grown = _rss_mb() - before
    assert engine.running == 0
    assert sorted(steps) == list(range(200))
    for index, taken in steps.items():
        wanted = {0: [0], 3: range(1, 12)}.get(index % 6, [12 + index % 9])
        assert taken in wanted, (index, taken)
    assert grown < 30, f"resident memory grew {grown:.1f} MB over 160 jobs"
    # Every slot is usable again: 8 at once all finish.
    results: list[int] = []
    runs = [threading.Thread(target=lambda i=i: results.append(engine.synthesize(
        build_conversation("Again"), GREEDY).generated_tokens)) for i in range(8)]  # fmt: skip
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join(timeout=120)
    assert results == [30] * 8


def test_a_failing_prefill_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request decodes, a clip the audio tokenizer cannot encode (no samples)
    and a prefill that runs out of memory (no GPU here: the model's forward, which only
    prefill uses, raises CUDA's error) each fail alone; the running request's codes are
    those it has alone."""
    long = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=60)
    text = build_conversation("A long one that keeps going.")
    alone = engine.synthesize(text, long)
    forward = engine.model.forward

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def after_prefill(frames: torch.Tensor) -> None:
        runs.count(frames)
        if runs.frames >= 2:
            monkeypatch.setattr(engine.model, "forward", out_of_memory)

    runs = Staggered()
    runs.start("long", 0, lambda: engine.synthesize(text, long, on_frames=after_prefill))
    runs.start("out of memory", 3, lambda: engine.synthesize(build_conversation("Hi"), GREEDY))
    results = runs.join()
    monkeypatch.setattr(engine.model, "forward", forward)
    silent = ReferenceClip(np.zeros(0, dtype=np.float32), "Nothing at all.")
    runs = Staggered()
    runs.start("long", 0, lambda: engine.synthesize(text, long, on_frames=runs.count))
    runs.start("bad clip", 3, lambda: engine.synthesize(
        build_conversation("Hi", voice=silent), GREEDY))  # fmt: skip
    results_clip = runs.join()
    assert isinstance(results["out of memory"], OutOfMemoryError)
    assert isinstance(results_clip["bad clip"], RuntimeError)
    for outcome in (results["long"], results_clip["long"]):
        assert torch.equal(outcome.codes, alone.codes)  # type: ignore[union-attr]


def test_out_of_memory_in_a_decode_step_evicts_the_newest(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the step raises CUDA's error once, as a step that needed more memory
    than was free would; the newest of the three running requests stops with a clear
    error, the other two carry on with the codes they have alone."""
    # The first two run long enough that the third joins them even on a loaded machine,
    # where its thread may start many steps late.
    greedy = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=300)
    params = {"first": greedy, "second": greedy, "third": replace(greedy, max_new_tokens=50)}
    texts = {name: build_conversation(f"Request {name}.") for name in params}
    alone = {name: engine.synthesize(text, params[name]) for name, text in texts.items()}
    step = engine.step
    armed = threading.Event()

    def failing_step(rows: int, length: int, settings: list[SamplingParams]) -> torch.Tensor:
        if armed.is_set() and len(settings) == 3:
            armed.clear()
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return step(rows, length, settings)

    monkeypatch.setattr(engine, "step", failing_step)
    runs = Staggered()

    def counted(frames: torch.Tensor) -> None:
        runs.count(frames)
        if runs.frames >= 14:
            armed.set()

    for name, at in zip(texts, [0, 3, 8], strict=True):
        runs.start(name, at, lambda t=texts[name], p=params[name]: engine.synthesize(
            t, p, on_frames=counted))  # fmt: skip
    results = runs.join()
    assert isinstance(results["third"], OutOfMemoryError)
    assert "newest" in str(results["third"])
    for name in ("first", "second"):
        assert torch.equal(results[name].codes, alone[name].codes)  # type: ignore[union-attr]
