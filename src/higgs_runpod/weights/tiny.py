"""Build a tiny, randomly initialised Higgs Audio v2 checkpoint (it speaks noise).

The checkpoint has the real architecture (the same `transformers` classes, the same file
layout, a chat template for the roles system/scene/user/assistant) at a size that runs on
a laptop CPU in milliseconds. Tests build one per session; users try the API offline with
it. Nothing is downloaded: the text tokenizer is trained here on a few sentences.

    DIR/model      generation model + text tokenizer + feature extractor + chat template
    DIR/tokenizer  audio tokenizer (DAC acoustic branch + HuBERT semantic branch)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DacFeatureExtractor,
    HiggsAudioV2Config,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2TokenizerConfig,
    HiggsAudioV2TokenizerModel,
    PreTrainedTokenizerFast,
)

SAMPLE_RATE = 24_000
HOP_LENGTH = 960  # 25 frames per second, as in the real tokenizer
TINY_CODES = 16  # codes per codebook in the tiny audio tokenizer
TINY_CODEBOOKS = 4

# Special tokens of the Higgs Audio v2 text tokenizer that prompts and the processor use.
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [
    BOS,
    EOS,
    PAD,
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|scene_desc_start|>",
    "<|scene_desc_end|>",
    "<|audio_out_bos|>",
    "<|audio_eos|>",
    "<|AUDIO_OUT|>",
    "<|reserved_special_token_6|>",
    "<SE>",
    "</SE>",
    "<SE_s>",
    "</SE_s>",
    "<SE_e>",
    "</SE_e>",
]

# The conversation format documented for Higgs Audio v2 in transformers: a system turn
# (optionally followed by a scene turn whose text and reference clips go inside the scene
# markers), then user text turns and assistant audio turns; the generation prompt opens an
# assistant turn with <|audio_out_bos|>.
CHAT_TEMPLATE = (files(__package__) / "chat_template.jinja").read_text(encoding="utf-8")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Generate audio following instruction.",
    "You are an AI assistant designed to convert text into speech.",
    "Hello, world! How are you today? Fine, thanks.",
    "SPEAKER0: feminine. SPEAKER1: masculine. [SPEAKER0] [SPEAKER1]",
    "Audio is recorded in a quiet room. 0123456789",
]


def train_byte_level_bpe(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on a few sentences: any UTF-8 text encodes, nothing is
    downloaded; `special_tokens` take the first ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    """A small text tokenizer with the prompt's special tokens (ids of its own choosing)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(SPECIAL_TOKENS),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_audio_tokenizer(
    seed: int = 0, codebooks: int = TINY_CODEBOOKS, codes: int = TINY_CODES
) -> HiggsAudioV2TokenizerModel:
    """A tiny audio tokenizer with the real frame rate (25 Hz): `codebooks` codebooks of
    `codes` codes each (the real one has 8 of 1024)."""
    torch.manual_seed(seed)
    bits = (codes - 1).bit_length()
    frame_rate = SAMPLE_RATE // HOP_LENGTH
    config = HiggsAudioV2TokenizerConfig(
        # num_quantizers = 1000 * bandwidth // (frame_rate * bits)
        target_bandwidths=[codebooks * frame_rate * bits / 1000],
        sample_rate=SAMPLE_RATE,
        codebook_size=codes,
        codebook_dim=8,
        acoustic_model_config={
            "encoder_hidden_size": 4,
            "downsampling_ratios": [8, 5, 4, 2, 3],
            "decoder_hidden_size": 32,  # divisible by 2 ** len(upsampling_ratios)
            "upsampling_ratios": [8, 5, 4, 2, 3],
            "hidden_size": 16,
            "sampling_rate": SAMPLE_RATE,
            "hop_length": HOP_LENGTH,
        },
        semantic_model_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [8] * 7,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        },
    )
    if config.num_quantizers != codebooks:
        raise ValueError(f"{codebooks} codebooks of {codes} codes give no whole bandwidth")
    model = HiggsAudioV2TokenizerModel(config).eval()
    # Codebooks start as zero buffers (real ones are learned): give them random vectors so
    # that decoded audio depends on the codes and encoding picks distinct codes.
    with torch.no_grad():
        for quantizer in model.quantizer.quantizers:
            quantizer.codebook.embed.normal_()
            quantizer.codebook.embed_avg.copy_(quantizer.codebook.embed)
    return model


TINY_SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
)


def sharpen_audio_head(model: HiggsAudioV2ForConditionalGeneration) -> None:
    """Make a random model talk until max_new_tokens.

    Random weights give near-uniform logits, so the stream EOS code would end audio after a
    dozen frames. Sharpen the audio head and give the stream BOS/EOS rows a zero logit: the
    model then never picks them, which makes lengths predictable.
    """
    config = model.config
    with torch.no_grad():
        head = model.audio_lm_head.weight.view(config.num_codebooks, config.codebook_size, -1)
        head.mul_(100.0)
        head[:, [config.audio_stream_bos_id, config.audio_stream_eos_id], :] = 0.0


def build_model(
    text_tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    shape: dict | None = None,
    codebooks: int = TINY_CODEBOOKS,
) -> HiggsAudioV2ForConditionalGeneration:
    """A generation model (two tiny layers unless `shape` says otherwise: benchmarks use
    bigger ones) whose audio vocabulary matches `build_audio_tokenizer(codebooks=...)`."""
    torch.manual_seed(seed)

    def ids(token: str) -> int:
        found = text_tokenizer.convert_tokens_to_ids(token)
        assert isinstance(found, int), token
        return found

    config = HiggsAudioV2Config(
        **(shape or TINY_SHAPE),
        vocab_size=len(text_tokenizer),
        max_position_embeddings=8192,
        num_codebooks=codebooks,
        codebook_size=TINY_CODES + 2,  # the codes plus stream BOS and EOS
        audio_stream_bos_id=TINY_CODES,
        audio_stream_eos_id=TINY_CODES + 1,
        audio_token_id=ids("<|AUDIO_OUT|>"),
        audio_bos_token_id=ids("<|audio_out_bos|>"),
        audio_delay_token_id=ids("<|reserved_special_token_6|>"),
        bos_token_id=ids(BOS),
        eos_token_id=ids("<|eot_id|>"),
        pad_token_id=ids(PAD),
    )
    model = HiggsAudioV2ForConditionalGeneration(config).eval()
    sharpen_audio_head(model)
    return model


T = TypeVar("T")


def on_a_passing_thread(build: Callable[[], T]) -> T:
    """Run `build` (tensor work: building or writing a model) on a thread that then exits.

    Tensor work starts an OpenMP thread team for the thread it runs on. While a second
    team lives (this caller's, beside the engine's decode loop), the loop's parallel
    regions run several times slower on a small CPU; a thread that exits takes its team
    with it. Tests and benchmarks build a model and then serve it in one process.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name="build")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def make_tiny_model(
    directory: Path, seed: int = 0, shape: dict | None = None, codebooks: int = TINY_CODEBOOKS
) -> tuple[Path, Path]:
    """Write DIR/model and DIR/tokenizer; returns (model_path, tokenizer_path)."""
    return on_a_passing_thread(lambda: _make_tiny_model(directory, seed, shape, codebooks))


def _make_tiny_model(
    directory: Path, seed: int, shape: dict | None, codebooks: int
) -> tuple[Path, Path]:
    model_dir, tokenizer_dir = directory / "model", directory / "tokenizer"
    text_tokenizer = build_text_tokenizer()
    build_model(text_tokenizer, seed, shape, codebooks).save_pretrained(model_dir)
    text_tokenizer.save_pretrained(model_dir)
    DacFeatureExtractor(sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH).save_pretrained(model_dir)
    processor_config = {
        "processor_class": "HiggsAudioV2Processor",
        "audio_stream_bos_id": TINY_CODES,
        "audio_stream_eos_id": TINY_CODES + 1,
        "audio_tokenizer": str(tokenizer_dir),
    }
    (model_dir / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    build_audio_tokenizer(seed, codebooks).save_pretrained(tokenizer_dir)
    (directory / "README.txt").write_text(
        "Tiny randomly initialised Higgs Audio v2 checkpoint made by `higgs-runpod "
        "make-tiny-model`.\nIt has the real architecture but untrained weights: it speaks "
        "noise. Use it to try the API offline and in tests.\n"
    )
    return model_dir, tokenizer_dir
