"""The published-layout fixture: the conversion script's files and ids, and the worker on it.

Expected values are those `convert_higgs_audio_v2_to_hf.py` writes and Llama 3's tokenizer
holds, written out here rather than read back from the builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
)

from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.request.voices import ReferenceClip
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams

# Llama 3.2's ids, with Higgs Audio's renamed reserved tokens.
SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|finetune_right_pad_id|>": 128004,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|audio_bos|>": 128011,
    "<|audio_eos|>": 128012,
    "<|audio_out_bos|>": 128013,
    "<|reserved_special_token_6|>": 128014,
    "<|AUDIO|>": 128015,
    "<|AUDIO_OUT|>": 128016,
    "<|reserved_special_token_247|>": 128255,
}
GREEDY = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=20)


@pytest.fixture(scope="module")
def published_engine(published_checkpoint: tuple[Path, Path], voices_dir: Path) -> Engine:
    model_path, tokenizer_path = published_checkpoint
    env = {
        "MODEL_PATH": str(model_path),
        "TOKENIZER_PATH": str(tokenizer_path),
        "VOICES_PATH": str(voices_dir),
        "DEVICE": "cpu",
    }
    engine = Engine(load_settings(env))
    engine.load()
    return engine


def test_config_has_the_real_ids(published_checkpoint: tuple[Path, Path]) -> None:
    config = AutoConfig.from_pretrained(published_checkpoint[0])
    assert config.model_type == "higgs_audio_v2"
    assert (config.vocab_size, config.num_codebooks, config.codebook_size) == (128256, 8, 1026)
    assert (config.audio_stream_bos_id, config.audio_stream_eos_id) == (1024, 1025)
    assert (config.audio_token_id, config.audio_bos_token_id) == (128016, 128013)
    assert config.audio_delay_token_id == 128014
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 128009, 128001)
    assert config.dtype == torch.bfloat16


def test_generation_config_has_the_ids_and_ras_defaults(
    published_checkpoint: tuple[Path, Path],
) -> None:
    generation = GenerationConfig.from_pretrained(published_checkpoint[0])
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 128009)
    assert generation.pad_token_id == 128001
    assert (generation.ras_win_len, generation.ras_win_max_num_repeat) == (7, 2)
    assert generation.use_text_head is True


def test_processor_settings_and_chat_template(published_checkpoint: tuple[Path, Path]) -> None:
    model_path = published_checkpoint[0]
    saved = json.loads((model_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "HiggsAudioV2Processor"
    assert saved["feature_extractor"] == {
        "feature_extractor_type": "DacFeatureExtractor",
        "feature_size": 1,
        "hop_length": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "return_attention_mask": True,
        "sampling_rate": 24000,
    }
    assert (saved["audio_stream_bos_id"], saved["audio_stream_eos_id"]) == (1024, 1025)
    assert (saved["audio_token"], saved["audio_bos_token"], saved["audio_eos_token"]) == (
        "<|AUDIO_OUT|>",
        "<|audio_out_bos|>",
        "<|audio_eos|>",
    )
    # As in the published checkpoint, the audio tokenizer is named by its hub repo.
    assert saved["audio_tokenizer"]["audio_tokenizer_name_or_path"] == (
        "bosonai/higgs-audio-v2-tokenizer"
    )
    template = (model_path / "chat_template.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = tokenizer.apply_chat_template(
        build_conversation("Hi."),
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n<|audio_out_bos|>")


def test_text_head_weights_are_saved_and_ignored_on_load(
    published_checkpoint: tuple[Path, Path],
) -> None:
    model_path = published_checkpoint[0]
    with safe_open(model_path / "model.safetensors", framework="pt") as weights:
        names = weights.keys()
        assert "text_lm_head.weight" in names
        head = weights.get_slice("text_lm_head.weight")
        assert head.get_shape()[0] == 128256
        assert head.get_dtype() == "BF16"
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(model_path)
    assert model.text_lm_head is None
    assert model.dtype == torch.bfloat16  # as saved, like the published checkpoint


def test_tokenizer_has_every_special_token_at_its_id(
    published_checkpoint: tuple[Path, Path],
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(published_checkpoint[0])
    assert len(tokenizer) == 128256
    for token, token_id in SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id], token
    for token in ("<|scene_desc_start|>", "<|scene_desc_end|>", "<SE>", "</SE_e>"):
        (token_id,) = tokenizer.encode(token, add_special_tokens=False)
        assert 128017 <= token_id < 128256  # reserved slots: the real ids are not published
    added = tokenizer.added_tokens_decoder
    assert sorted(added) == list(range(128000, 128256))
    assert all(token.special for token in added.values())
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.pad_token_id == 128001
    assert tokenizer.bos_token_id == 128000
    assert tokenizer.encode("Hi")[0] == 128000  # Llama 3 adds <|begin_of_text|>
    text = "Grüße, 你好 <SE>[Laughter]</SE>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_default_processor_and_config_agree_with_the_tokenizer(
    published_checkpoint: tuple[Path, Path],
) -> None:
    """transformers' own defaults (processor token names, config ids) meet the same ids."""
    model_path, tokenizer_path = published_checkpoint
    processor = HiggsAudioV2Processor(
        feature_extractor=DacFeatureExtractor(),
        tokenizer=AutoTokenizer.from_pretrained(model_path),
        audio_tokenizer=HiggsAudioV2TokenizerModel.from_pretrained(tokenizer_path),
    )
    defaults = HiggsAudioV2Config()
    assert processor.audio_token_id == defaults.audio_token_id
    assert processor.audio_bos_token_id == defaults.audio_bos_token_id
    assert processor.audio_delay_token_id == defaults.audio_delay_token_id
    assert processor.audio_tokenizer.config.num_quantizers == defaults.num_codebooks
    assert processor.audio_tokenizer.config.codebook_size == 1024
    assert processor.audio_tokenizer.config.frame_rate == 25


@pytest.mark.parametrize("cloned", [False, True], ids=["smart-voice", "clone"])
def test_generate_makes_audio_codes_from_the_engines_prompt(
    published_checkpoint: tuple[Path, Path], published_engine: Engine, cloned: bool
) -> None:
    voice = None
    if cloned:
        t = np.arange(24_000) / 24_000
        voice = ReferenceClip((0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), "A tone.")
    inputs = published_engine.prompt_inputs(build_conversation("Hello there.", voice=voice))
    assert inputs["input_ids"][0, 0] == 128000
    assert inputs["input_ids"][0, -1] == 128013
    assert ("audio_input_ids" in inputs) == cloned
    context = inputs["audio_input_ids"].shape[1] if cloned else 0
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        published_checkpoint[0], dtype=torch.float32
    )
    output = model.generate(**inputs, do_sample=False, ras_win_len=None, max_new_tokens=12)
    codes = output[0, context:]
    assert codes.shape == (12, 8)
    assert torch.all(codes[0] == 1024)  # the stream opens with BOS on every codebook
    # The delay pattern: codebook k starts k steps after codebook 0; then only real codes.
    for step in range(1, 8):
        assert torch.all(codes[step, step:] == 1024) and torch.all(codes[step, :step] < 1024)
    assert torch.all(codes[8:] < 1024)


def test_engine_speaks_from_the_published_layout(published_engine: Engine) -> None:
    result = published_engine.synthesize(build_conversation("Hello there."), GREEDY)
    assert result.codes.shape == (20 - 1 - 7, 8)
    assert int(result.codes.max()) < 1024
    samples = published_engine.decode_codes(result.codes)
    assert len(samples) == result.frames * 960
    assert np.isfinite(samples).all() and np.abs(samples).max() > 0
    sampled = published_engine.synthesize(
        build_conversation("Hello there."), SamplingParams(seed=3, max_new_tokens=20)
    )
    assert sampled.codes.shape == result.codes.shape
    assert not torch.equal(sampled.codes, result.codes)
