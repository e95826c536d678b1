"""The engine's own decode loop against `model.generate`, the reference (CPU, float32).

Under greedy decoding with RAS off both are deterministic, so a request's codes must equal
generate's for the same prompt exactly: alone, and as a row among others that joined the
batch at other steps. Each kind of prompt is covered (smart voice, clone, two cloned
speakers, a long-text chunk carrying earlier codes) on models of two shapes (different
codebook counts, layer counts and hidden sizes) and on the published checkpoint's
layout (real token ids, pad = EOS, its generation config).
"""

from __future__ import annotations

import io

import pytest
import soundfile
import torch
from transformers import GenerationConfig

from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.request.voices import ReferenceClip
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams, Synthesis
from higgs_runpod.synthesis.streaming import DelayAligner
from higgs_runpod.weights.tiny import make_tiny_model
from support.audio import make_wav
from support.engine import Staggered

STEPS = 28
GREEDY = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=STEPS)
OTHER_SHAPE = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # fmt: skip


def clip(seconds: float, freq: float) -> ReferenceClip:
    samples, _ = soundfile.read(io.BytesIO(make_wav(seconds, freq=freq)), dtype="float32")
    return ReferenceClip(samples, "Hello there.")


ENGINES: dict[str, Engine] = {}


def engine_for(kind: str, request: pytest.FixtureRequest) -> Engine:
    """The session's tiny engine, or one built once per module for another model."""
    if kind == "tiny":
        return request.getfixturevalue("engine")
    if kind not in ENGINES:
        if kind == "published layout":
            model_path, tokenizer_path = request.getfixturevalue("published_checkpoint")
        else:
            directory = request.getfixturevalue("tmp_path_factory").mktemp("other")
            model_path, tokenizer_path = make_tiny_model(
                directory, seed=3, shape=OTHER_SHAPE, codebooks=8
            )
        engine = Engine(load_settings({"MODEL_PATH": str(model_path),
                                       "TOKENIZER_PATH": str(tokenizer_path)}))  # fmt: skip
        engine.load()
        ENGINES[kind] = engine
    return ENGINES[kind]


@pytest.fixture(params=["tiny", "other shape", "published layout"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    engine = engine_for(request.param, request)
    assert engine.dtype == torch.float32
    return engine


def prompts(engine: Engine) -> dict[str, list[dict]]:
    earlier = engine.synthesize(build_conversation("Before this."), GREEDY).codes
    return {
        "smart voice": build_conversation("Hello, world! How are you today?"),
        "clone": build_conversation("The quick brown fox.", voice=clip(1.2, 330.0)),
        "two cloned speakers": build_conversation(
            "[SPEAKER0] Hello there. [SPEAKER1] Fine, thanks.",
            speakers={"SPEAKER0": clip(0.8, 220.0), "SPEAKER1": clip(1.0, 440.0)},
        ),
        "long-text chunk": build_conversation(
            "And then this.", history=[("Before this.", earlier)]
        ),
    }


def generate_codes(
    engine: Engine, conversation: list[dict], steps: int
) -> tuple[torch.Tensor, int]:
    """generate's codes for the conversation (greedy, RAS off) and its step count."""
    inputs = engine.prompt_inputs(conversation)
    config = GenerationConfig.from_dict(engine.model.generation_config.to_dict())
    config.update(max_new_tokens=steps, do_sample=False, temperature=None, top_p=None, top_k=None)
    # RAS off. Not `ras_win_len=None`: generate takes a field left unset from the model's
    # own generation config, and the published one turns RAS on (window 7, 2 repeats).
    config.update(ras_win_len=1, ras_win_max_num_repeat=2)  # no window of 1 holds 2 repeats
    audio = engine.call(lambda: engine.model.generate(**inputs, generation_config=config))
    prompt_audio = inputs["audio_input_ids"].shape[1] if "audio_input_ids" in inputs else 0
    generated = audio[0, prompt_audio:]
    aligner = DelayAligner(engine.vocab.stream_bos, engine.vocab.stream_eos)
    frames = [aligner.push(step) for step in generated]
    return torch.cat(frames), int(generated.shape[0])


def assert_same(result: Synthesis, reference: tuple[torch.Tensor, int]) -> None:
    codes, steps = reference
    assert result.generated_tokens == steps
    assert result.codes.shape == codes.shape
    assert torch.equal(result.codes, codes)


def test_alone_equals_generate(any_engine: Engine) -> None:
    for name, conversation in prompts(any_engine).items():
        result = any_engine.synthesize(conversation, GREEDY)
        assert result.frames > 0, name
        assert_same(result, generate_codes(any_engine, conversation, STEPS))


def test_rows_that_joined_at_other_steps_equal_generate(any_engine: Engine) -> None:
    """A long request runs; each prompt joins once it has produced a different number of
    frames, so every row enters the batch at another step and leaves on its own."""
    conversations = prompts(any_engine)
    references = {name: generate_codes(any_engine, c, STEPS) for name, c in conversations.items()}
    joins = dict(zip(conversations, [2, 5, 9, 14], strict=True))
    runs = Staggered()
    for name, at in joins.items():
        runs.start(name, at, lambda c=conversations[name]: any_engine.synthesize(c, GREEDY))
    long = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=120)
    background = any_engine.synthesize(
        build_conversation("A long one."), long, on_frames=runs.count
    )
    results = runs.join()
    assert background.generated_tokens == 120
    for name, reference in references.items():
        assert_same(results[name], reference)
