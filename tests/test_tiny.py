"""The tiny checkpoint is a real Higgs Audio v2 checkpoint that loads by from_pretrained."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerModel,
)

from higgs_runpod.weights.tiny import make_tiny_model, on_a_passing_thread


def test_loads_with_the_standard_classes(tiny_checkpoint: tuple[Path, Path]) -> None:
    model_path, tokenizer_path = tiny_checkpoint
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(model_path)
    audio_tokenizer = HiggsAudioV2TokenizerModel.from_pretrained(tokenizer_path)
    assert AutoConfig.from_pretrained(model_path).model_type == "higgs_audio_v2"
    # The model's audio vocabulary is the tokenizer's codes plus stream BOS and EOS.
    assert model.config.num_codebooks == audio_tokenizer.config.num_quantizers
    assert model.config.codebook_size == audio_tokenizer.config.codebook_size + 2
    assert audio_tokenizer.config.frame_rate == 25
    assert model.num_parameters() < 1_000_000


def test_text_tokenizer_has_the_prompt_tokens(tiny_checkpoint: tuple[Path, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint[0])
    for token in ("<|AUDIO_OUT|>", "<|audio_out_bos|>", "<|scene_desc_start|>", "<|eot_id|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1
    assert (
        tokenizer.decode(tokenizer.encode("Grüße, 你好", add_special_tokens=False)) == "Grüße, 你好"
    )


def test_says_it_speaks_noise(tiny_checkpoint: tuple[Path, Path]) -> None:
    readme = (tiny_checkpoint[0].parent / "README.txt").read_text()
    assert "speaks noise" in readme
    assert (
        json.loads((tiny_checkpoint[0] / "processor_config.json").read_text())[
            "audio_stream_bos_id"
        ]
        == 16
    )


def test_other_codebook_counts_agree(tmp_path: Path) -> None:
    """Parity tests build tiny shapes with other codebook counts."""
    model_path, tokenizer_path = make_tiny_model(tmp_path, seed=1, codebooks=6)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(model_path)
    audio_tokenizer = HiggsAudioV2TokenizerModel.from_pretrained(tokenizer_path)
    assert model.config.num_codebooks == audio_tokenizer.config.num_quantizers == 6
    prompt = AutoTokenizer.from_pretrained(model_path)("Hi", return_tensors="pt")
    codes = model.generate(**prompt, do_sample=False, max_new_tokens=9)
    assert codes.shape == (1, 9, 6)
    assert torch.all(codes[0, -1] < 16)  # past the delay pattern every codebook has a code


def test_a_build_runs_on_a_thread_of_its_own_that_is_gone_after() -> None:
    """The caller's thread never runs the tensor work (so it starts no OpenMP team of its
    own beside the engine's); the build's thread has ended when the result comes back."""
    ran_on: list[threading.Thread] = []

    def build() -> torch.Tensor:
        ran_on.append(threading.current_thread())
        return torch.ones(1_000_000).add_(1)  # big enough for a parallel region

    result = on_a_passing_thread(build)
    assert float(result.sum()) == 2_000_000
    assert ran_on[0] is not threading.current_thread()
    assert not ran_on[0].is_alive()


def test_a_failing_build_raises_in_the_caller() -> None:
    with pytest.raises(ZeroDivisionError):
        on_a_passing_thread(lambda: 1 / 0)
