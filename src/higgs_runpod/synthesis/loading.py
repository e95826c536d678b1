"""Loading the checkpoints from the volume: the model, its processor, and the voice cache
bound to both.

The processor is assembled from its parts (text tokenizer and chat template from
MODEL_PATH, the audio tokenizer from TOKENIZER_PATH) so that nothing is looked up on the
hub at run time. `ensure_checkpoints` runs first: the queue start has called it already
(to fail fast, before the heavy imports), and then it only checks the completion markers;
the HTTP server and `synth` rely on it here to download a checkpoint that is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoTokenizer,
    DacFeatureExtractor,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
)

from higgs_runpod.errors import ModelNotFoundError
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.voice_cache import CodesShape, VoiceCache, tokenizer_identity
from higgs_runpod.weights.model_store import ensure_checkpoints

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    model: HiggsAudioV2ForConditionalGeneration
    processor: HiggsAudioV2Processor
    voice_cache: VoiceCache


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` means CUDA in bfloat16 when a GPU is visible, else CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


def load_checkpoints(settings: Settings, device: torch.device, dtype: torch.dtype) -> Loaded:
    """Both checkpoints from disk onto `device`, and a voice cache for this tokenizer."""
    paths, readies = ensure_checkpoints(settings)
    for ready in readies:  # the start-up already reported these at INFO
        log.debug("%s", ready.describe())
    log.info("loading %s on %s (%s)", paths.model_path, device, dtype)
    if device.type == "cuda":  # TF32 for the audio tokenizer's float32 convolutions
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
    audio_tokenizer = HiggsAudioV2TokenizerModel.from_pretrained(
        paths.tokenizer_path, device_map=device
    ).eval()
    text_tokenizer = AutoTokenizer.from_pretrained(paths.model_path)
    model = HiggsAudioV2ForConditionalGeneration.from_pretrained(
        paths.model_path, dtype=dtype, device_map=device, attn_implementation="sdpa"
    ).eval()
    template_file = paths.model_path / "chat_template.jinja"
    chat_template = (
        template_file.read_text() if template_file.is_file() else text_tokenizer.chat_template
    )
    if not chat_template:
        raise ModelNotFoundError(f"MODEL_PATH={paths.model_path} has no chat template")
    tokenizer_config = audio_tokenizer.config
    processor = HiggsAudioV2Processor(
        feature_extractor=DacFeatureExtractor(
            sampling_rate=tokenizer_config.sample_rate, hop_length=tokenizer_config.hop_length
        ),
        tokenizer=text_tokenizer,
        audio_tokenizer=audio_tokenizer,
        chat_template=chat_template,
        audio_stream_bos_id=model.config.audio_stream_bos_id,
        audio_stream_eos_id=model.config.audio_stream_eos_id,
    )
    voice_cache = VoiceCache(
        tokenizer_identity(paths.tokenizer_path, readies[1].commit),
        settings.voice_cache_items,
        settings.voice_cache_path,
    )
    voice_cache.bind(  # cached files are checked against what this model accepts
        CodesShape(model.config.num_codebooks, tokenizer_config.codebook_size),
        int(settings.voice_cache_max_mb * 1_000_000),
    )
    return Loaded(model, processor, voice_cache)
