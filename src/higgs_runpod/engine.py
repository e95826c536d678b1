"""The model behind a small interface: load once, then conversation in, waveform out.

Built on transformers' native Higgs Audio v2 classes. The processor is assembled from its
parts (text tokenizer and chat template from MODEL_PATH, the audio tokenizer from
TOKENIZER_PATH) so that nothing is looked up on the hub at run time.

    conversation --processor--> input ids + reference codes --generate--> delayed codes
                 --revert delay--> codes (frames x codebooks) --audio tokenizer--> samples
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .errors import GenerationCancelled, ModelNotFoundError, OutOfMemoryError
from .model_store import check_checkpoints
from .settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    seed: int | None = None
    max_new_tokens: int = 2048
    ras_win_len: int = 7
    ras_win_max_num_repeat: int = 2


@dataclass(frozen=True)
class Synthesis:
    samples: np.ndarray  # float32 mono at sample_rate
    sample_rate: int
    codes: torch.Tensor  # (frames, codebooks), on the CPU
    prompt_tokens: int
    generated_tokens: int
    seed: int
    prepare_ms: float
    generate_ms: float
    decode_ms: float

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` means CUDA in bfloat16 when a GPU is visible, else CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved.type == "cuda" else torch.float32
    return resolved, getattr(torch, dtype)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class Engine:
    """One model per worker process; `synthesize` calls are serialised by a lock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device, self.dtype = resolve_device(settings.device, settings.dtype)
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self.model: HiggsAudioV2ForConditionalGeneration | None = None
        self.processor: HiggsAudioV2Processor | None = None

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def sample_rate(self) -> int:
        return int(self._processor.audio_tokenizer.config.sample_rate)

    @property
    def frame_rate(self) -> float:
        config = self._processor.audio_tokenizer.config
        return config.sample_rate / config.hop_length

    @property
    def _processor(self) -> HiggsAudioV2Processor:
        if self.processor is None:
            raise RuntimeError("the engine is not loaded")
        return self.processor

    def load(self) -> float:
        """Load the checkpoints (once); returns the seconds this call spent waiting or loading."""
        start = time.perf_counter()
        with self._load_lock:
            if self.model is None:
                self._load()
        return time.perf_counter() - start

    def _load(self) -> None:
        paths = check_checkpoints(self.settings)
        log.info("loading %s on %s (%s)", paths.model_path, self.device, self.dtype)
        audio_tokenizer = HiggsAudioV2TokenizerModel.from_pretrained(
            paths.tokenizer_path, device_map=self.device
        ).eval()
        text_tokenizer = AutoTokenizer.from_pretrained(paths.model_path)
        model = HiggsAudioV2ForConditionalGeneration.from_pretrained(
            paths.model_path, dtype=self.dtype, device_map=self.device
        ).eval()
        template_file = paths.model_path / "chat_template.jinja"
        chat_template = (
            template_file.read_text() if template_file.is_file() else text_tokenizer.chat_template
        )
        if not chat_template:
            raise ModelNotFoundError(f"MODEL_PATH={paths.model_path} has no chat template")
        tokenizer_config = audio_tokenizer.config
        self.processor = HiggsAudioV2Processor(
            feature_extractor=DacFeatureExtractor(
                sampling_rate=tokenizer_config.sample_rate, hop_length=tokenizer_config.hop_length
            ),
            tokenizer=text_tokenizer,
            audio_tokenizer=audio_tokenizer,
            chat_template=chat_template,
            audio_stream_bos_id=model.config.audio_stream_bos_id,
            audio_stream_eos_id=model.config.audio_stream_eos_id,
        )
        self.model = model
        log.info("model loaded: %.1fM parameters", model.num_parameters() / 1e6)

    def synthesize(
        self,
        conversation: list[dict[str, Any]],
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Synthesis:
        """Generate speech for one conversation (see prompts.build_conversation).

        Setting `cancel` (from another thread) stops generation at the next decode step
        and raises `GenerationCancelled`, so a caller that went away frees the model.
        """
        self.load()
        cancel = cancel or threading.Event()
        with self._generate_lock:
            try:
                if cancel.is_set():
                    raise GenerationCancelled("cancelled before generation started")
                return self._synthesize(conversation, params, cancel)
            except torch.cuda.OutOfMemoryError:
                raise OutOfMemoryError(
                    "the GPU ran out of memory for this request; try a shorter text, a shorter "
                    "reference clip or a smaller max_new_tokens"
                ) from None
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @torch.inference_mode()
    def _synthesize(
        self, conversation: list[dict[str, Any]], params: SamplingParams, cancel: threading.Event
    ) -> Synthesis:
        assert self.model is not None
        processor = self._processor
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            conversation,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"sampling_rate": self.sample_rate},
        ).to(self.device)
        prompt_audio_len = inputs["audio_input_ids"].shape[1] if "audio_input_ids" in inputs else 0
        prepare_ms = _ms_since(start)

        seed = params.seed if params.seed is not None else random.randrange(2**32)
        torch.manual_seed(seed)
        start = time.perf_counter()
        sequences = self.model.generate(
            **inputs,
            generation_config=self._generation_config(params),
            stopping_criteria=StoppingCriteriaList([_StopWhenSet(cancel)]),
        )
        generate_ms = _ms_since(start)
        if cancel.is_set():
            raise GenerationCancelled(f"cancelled after {sequences.shape[1]} decode steps")

        start = time.perf_counter()
        generated = sequences[0, prompt_audio_len:]
        codes = self._strip_stream_markers(generated)
        if codes.shape[0] > 0:
            audio = processor.audio_tokenizer.decode(codes.T.unsqueeze(0)).audio_values
            samples = audio.float().reshape(-1).cpu().numpy()
        else:
            samples = np.zeros(0, dtype=np.float32)
        decode_ms = _ms_since(start)
        return Synthesis(
            samples=samples,
            sample_rate=self.sample_rate,
            codes=codes.cpu(),
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            generated_tokens=int(generated.shape[0]),
            seed=seed,
            prepare_ms=prepare_ms,
            generate_ms=generate_ms,
            decode_ms=decode_ms,
        )

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        assert self.model is not None
        config = GenerationConfig.from_dict(self.model.generation_config.to_dict())
        greedy = params.temperature == 0.0
        config.update(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy or params.top_k == 0 else params.top_k,
        )
        # Repetition-aware sampling: generate reads these two attributes when both are set.
        config.ras_win_len = params.ras_win_len or None
        config.ras_win_max_num_repeat = params.ras_win_max_num_repeat
        return config

    def _strip_stream_markers(self, generated: torch.Tensor) -> torch.Tensor:
        """Delayed codes as generated (steps x codebooks) -> aligned codes (frames x codebooks).

        Generation opens with all-BOS frames and, when the model finishes, closes with
        all-EOS frames; the codebooks in between are offset by the delay pattern.
        """
        processor = self._processor
        bos, eos = processor.audio_stream_bos_id, processor.audio_stream_eos_id
        opening = (generated == bos).all(dim=-1).nonzero()
        body = generated[int(opening[-1]) + 1 :] if len(opening) else generated
        closing = (body == eos).all(dim=-1).nonzero()
        body = body[: int(closing[0])] if len(closing) else body
        if body.shape[0] < body.shape[1]:
            return body.new_zeros((0, body.shape[1]))
        return processor.revert_delay_pattern(body).clamp(0, bos - 1)


class _StopWhenSet(StoppingCriteria):
    """Stops every sequence of the batch once the event is set (checked each decode step)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = self.event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)
