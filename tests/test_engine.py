"""The engine on the real transformers classes, with the tiny checkpoint on the CPU."""

from __future__ import annotations

import threading

import pytest
import torch

from higgs_runpod.engine import Engine, SamplingParams, resolve_device
from higgs_runpod.errors import OutOfMemoryError, RequestError
from higgs_runpod.prompts import build_conversation
from higgs_runpod.settings import load_settings

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
    assert len(result.samples) == result.frames * 960
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
    assert (result.generated_tokens, result.frames, len(result.samples)) == (1, 0, 0)


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
