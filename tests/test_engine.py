"""The engine on the real transformers classes, with the tiny checkpoint on the CPU."""

from __future__ import annotations

import pytest
import torch

from higgs_runpod.engine import Engine, SamplingParams, resolve_device
from higgs_runpod.errors import OutOfMemoryError
from higgs_runpod.prompts import build_conversation

# RAS resamples repeated codes at random even when greedy, so greedy runs switch it off.
GREEDY = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=30)


def test_loaded_from_the_checkpoint_directories(engine: Engine) -> None:
    assert engine.is_loaded
    assert (engine.device.type, engine.dtype) == ("cpu", torch.float32)
    assert type(engine.model).__name__ == "HiggsAudioV2ForConditionalGeneration"
    assert engine.sample_rate == 24_000
    assert engine.frame_rate == 25.0


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


def test_out_of_memory_fails_cleanly_and_recovers(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: generate is replaced to raise the CUDA OOM error a GPU would raise."""

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(engine.model, "generate", out_of_memory)
        with pytest.raises(OutOfMemoryError, match="ran out of memory"):
            engine.synthesize(build_conversation("Hi"), GREEDY)
    assert engine.synthesize(build_conversation("Hi"), GREEDY).frames > 0
