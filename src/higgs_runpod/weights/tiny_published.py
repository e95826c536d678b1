"""A tiny random checkpoint laid out as the published Higgs Audio v2 checkpoint.

transformers' `convert_higgs_audio_v2_to_hf.py` writes the published checkpoint from Boson's
original weights; this builder writes the same files with the same values, at a tiny size,
so that code which only ever met `tiny.py`'s own ids meets the real ones:

    DIR/model
      config.json             real token ids, vocabulary 128256, 8 codebooks of 1024 + 2
      generation_config.json  bos 1, eos 128009, pad 128001, RAS window 7 with 2 repeats
      model.safetensors       bfloat16, with `text_lm_head.weight` (use_text_head=True)
      tokenizer.json ...      Llama 3 special tokens at their ids, pad token = EOS token
      processor_config.json   the feature extractor settings, stream BOS/EOS 1024/1025 and
                              the audio tokenizer named by its hub repo id
      chat_template.jinja     this project's template for the same roles and tokens
    DIR/tokenizer             an audio tokenizer with 8 codebooks of 1024 codes at 25 Hz

What stays tiny: hidden size, layers and the audio tokenizer's widths. The text vocabulary
keeps its real size so that the special ids are the real ones; the ids below 128000 are a
small byte-level BPE followed by unreachable filler tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, processors
from transformers import (
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    PreTrainedTokenizerFast,
)

from higgs_runpod.weights.tiny import (
    CHAT_TEMPLATE,
    SAMPLE_RATE,
    SPECIAL_TOKENS,
    TINY_SHAPE,
    build_audio_tokenizer,
    sharpen_audio_head,
    train_byte_level_bpe,
)

PUBLISHED_MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
PUBLISHED_TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"
CODEBOOKS, CODES = 8, 1024
FIRST_SPECIAL_ID = 128_000  # Llama 3: 128000 ordinary tokens, then 256 special ones
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"

# Llama 3.1/3.2's first special tokens; the rest are <|reserved_special_token_N|> from
# N = 3 at id 128011 up to N = 247 at id 128255.
_LLAMA3_NAMED = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
# Higgs Audio renames reserved tokens 3, 4, 5, 7 and 8 (its original configuration says
# so); reserved token 6 (128014) stays as it is and is the delay-pattern token.
_HIGGS_AUDIO_IDS = {
    128011: "<|audio_bos|>",
    128012: "<|audio_eos|>",
    128013: "<|audio_out_bos|>",
    128015: "<|AUDIO|>",
    128016: "<|AUDIO_OUT|>",
}
# The prompt tokens whose ids neither the conversion script nor either configuration fixes
# (scene markers, sound events): this fixture puts them in the next reserved slots, from
# 128017 on.
_PLACED = {*_LLAMA3_NAMED, *_HIGGS_AUDIO_IDS.values(), "<|reserved_special_token_6|>"}
_PROMPT_TOKENS = [token for token in SPECIAL_TOKENS if token not in _PLACED]

# Small enough that the 128256 x hidden embedding and text head stay a few MB.
PUBLISHED_SHAPE = {**TINY_SHAPE, "hidden_size": 16, "intermediate_size": 32, "head_dim": 8}


def special_tokens() -> list[str]:
    """The 256 special tokens in id order, from 128000."""
    names = _LLAMA3_NAMED + [f"<|reserved_special_token_{n}|>" for n in range(3, 248)]
    for token_id, name in _HIGGS_AUDIO_IDS.items():
        names[token_id - FIRST_SPECIAL_ID] = name
    start = 128017 - FIRST_SPECIAL_ID
    names[start : start + len(_PROMPT_TOKENS)] = _PROMPT_TOKENS
    return names


def build_published_text_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with the real special ids; like the processor the conversion
    script saves, its pad token is its EOS token."""
    trained = train_byte_level_bpe([])
    merges = json.loads(trained.to_str())["model"]["merges"]
    vocab = trained.get_vocab()
    # No merge produces these, so text never encodes to them: they only fill the ids.
    vocab.update({f"<|unused_{i}|>": i for i in range(len(vocab), FIRST_SPECIAL_ID)})
    tokenizer = Tokenizer(models.BPE(vocab, [tuple(merge) for merge in merges]))
    tokenizer.pre_tokenizer = trained.pre_tokenizer
    tokenizer.decoder = trained.decoder
    tokenizer.add_special_tokens(special_tokens())
    # Llama 3 puts <|begin_of_text|> in front when special tokens are asked for.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, FIRST_SPECIAL_ID)]
    )
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, model_max_length=131_072
    )
    text_tokenizer.pad_token = text_tokenizer.eos_token
    return text_tokenizer


def build_published_model(
    seed: int = 0, shape: dict | None = None
) -> HiggsAudioV2ForConditionalGeneration:
    """The generation model with the conversion script's configuration and generation
    settings, at `shape` (PUBLISHED_SHAPE unless given)."""
    torch.manual_seed(seed)
    # The script configures only the codebook size: every other value is a default, and
    # the defaults are the real token ids.
    config = HiggsAudioV2Config(codebook_size=CODES + 2, **(shape or PUBLISHED_SHAPE))
    model = HiggsAudioV2ForConditionalGeneration(config, use_text_head=True).eval()
    sharpen_audio_head(model)
    model.generation_config = GenerationConfig(
        bos_token_id=1,
        eos_token_id=128009,
        pad_token_id=128001,
        ras_win_len=7,
        ras_win_max_num_repeat=2,
        use_text_head=True,
    )
    return model.to(torch.bfloat16)


def make_published_layout_model(
    directory: Path, seed: int = 0, shape: dict | None = None
) -> tuple[Path, Path]:
    """Write DIR/model and DIR/tokenizer; returns (model_path, tokenizer_path)."""
    model_dir, tokenizer_dir = directory / "model", directory / "tokenizer"
    build_published_model(seed, shape).save_pretrained(model_dir)
    audio_tokenizer = build_audio_tokenizer(seed, CODEBOOKS, CODES)
    audio_tokenizer.save_pretrained(tokenizer_dir)
    # processor_config.json names the audio tokenizer as the published one does: by repo id.
    audio_tokenizer.name_or_path = PUBLISHED_TOKENIZER_REPO
    HiggsAudioV2Processor(
        feature_extractor=DacFeatureExtractor(
            feature_size=1,
            hop_length=1,
            padding_side="right",
            padding_value=0.0,
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
        ),
        tokenizer=build_published_text_tokenizer(),
        audio_tokenizer=audio_tokenizer,
        chat_template=CHAT_TEMPLATE,
        audio_token="<|AUDIO_OUT|>",
        audio_bos_token="<|audio_out_bos|>",
        audio_eos_token="<|audio_eos|>",
        audio_stream_bos_id=CODES,
        audio_stream_eos_id=CODES + 1,
    ).save_pretrained(model_dir)
    (directory / "README.txt").write_text(
        "Tiny randomly initialised Higgs Audio v2 checkpoint in the published layout, made "
        "by `higgs-runpod make-tiny-model --published-layout`.\nIt has the real architecture, "
        f"token ids and file layout of {PUBLISHED_MODEL_REPO} but untrained weights: it "
        "speaks noise. processor_config.json names the real audio tokenizer "
        f"({PUBLISHED_TOKENIZER_REPO}); the matching tiny one is in tokenizer/.\n"
    )
    return model_dir, tokenizer_dir
