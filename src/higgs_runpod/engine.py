"""The model behind a small interface: load once, then conversation in, waveform out.

Built on transformers' native Higgs Audio v2 classes. The processor is assembled from its
parts (text tokenizer and chat template from MODEL_PATH, the audio tokenizer from
TOKENIZER_PATH) so that nothing is looked up on the hub at run time.

    conversation --chat template--> text + reference codes --generate--> delayed steps
                 --DelayAligner--> codes (frames x codebooks) --audio tokenizer--> samples

Audio in a conversation is either a waveform (`{"type": "audio", "audio": samples}`,
encoded here) or codes already (`{"type": "audio", "codes": tensor}`), which is how long
texts carry earlier chunks as context without re-encoding them.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    BatchFeature,
    DacFeatureExtractor,
    GenerationConfig,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .errors import ModelNotFoundError, OutOfMemoryError
from .model_store import ensure_checkpoints
from .settings import Settings
from .streaming import DelayAligner, receptive_field_frames
from .voice_cache import VoiceCache, tokenizer_identity

if TYPE_CHECKING:
    from .batcher import Batcher

log = logging.getLogger(__name__)

FrameCallback = Callable[[torch.Tensor], None]


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
    samples: np.ndarray  # float32 mono at sample_rate (empty when not decoded)
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
        self.decoder_context_frames = 0  # frames each side that one frame's audio depends on
        self.voice_cache: VoiceCache | None = None
        self._batcher: Batcher | None = None

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
        paths, readies = ensure_checkpoints(self.settings)
        for ready in readies:  # the start-up already reported these at INFO
            log.debug("%s", ready.describe())
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
        self.voice_cache = VoiceCache(
            tokenizer_identity(paths.tokenizer_path, readies[1].commit),
            self.settings.voice_cache_items,
            self.settings.voice_cache_path,
        )
        self.model = model
        if self.settings.max_batch_size > 1:
            from .batcher import Batcher

            self._batcher = Batcher(
                self._run_batch, self.settings.batch_window_ms, self.settings.max_batch_size
            )
        self.decoder_context_frames = receptive_field_frames(
            self.decode_codes, model.config.num_codebooks
        )
        log.info("model loaded: %s parameters", f"{model.num_parameters():,}")

    def synthesize(
        self,
        conversation: list[dict[str, Any]],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        on_frames: FrameCallback | None = None,
        decode: bool = True,
    ) -> Synthesis:
        """Generate speech for one conversation (see prompts.build_conversation).

        `on_frames` receives each batch of newly completed frames (frames x codebooks) from
        the generating thread as soon as every codebook has them; setting `cancel` stops
        generation after the current step.
        """
        self.load()
        if self._batcher is not None:
            return self._batcher.submit(Job(conversation, params, cancel, on_frames, decode))
        with self._generate_lock:
            try:
                return self._synthesize(conversation, params, cancel, on_frames, decode)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    @torch.inference_mode()
    def encode_clip(self, samples: np.ndarray) -> torch.Tensor:
        """A reference clip (float32 mono at sample_rate) -> codes (frames x codebooks)."""
        processor = self._processor
        features = processor.feature_extractor(
            samples, sampling_rate=self.sample_rate, return_tensors="pt"
        )
        input_values = features["input_values"].to(self.device)
        codes = processor.audio_tokenizer.encode(input_values).audio_codes
        return codes[0].T

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """Codes (frames x codebooks) -> float32 mono samples."""
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        audio = self._processor.audio_tokenizer.decode(codes.T.unsqueeze(0).to(self.device))
        return audio.audio_values.float().reshape(-1).cpu().numpy()

    def _prepare(self, conversation: list[dict[str, Any]]) -> BatchFeature:
        """Render the chat template and put each clip's delayed codes where its placeholder is.

        The same steps as the processor's own `__call__`, except that clips given as codes
        are used as they are instead of being decoded and encoded again.
        """
        processor = self._processor
        text = processor.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        clips = [item for m in conversation for item in m["content"] if item["type"] == "audio"]
        pieces = text.split(processor.audio_token)
        if len(pieces) != len(clips) + 1:
            raise ValueError("the chat template placed a different number of clips")
        delayed = [self._delayed(self._clip_codes(clip)) for clip in clips]
        text = pieces[0] + "".join(
            processor.get_audio_tokens(len(steps)) + piece
            for steps, piece in zip(delayed, pieces[1:], strict=True)
        )
        inputs = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        if delayed:
            audio_input_ids = torch.cat(delayed).unsqueeze(0)
            inputs["audio_input_ids"] = audio_input_ids
            inputs["audio_input_ids_mask"] = torch.ones(audio_input_ids.shape[:2], dtype=torch.bool)
        return inputs.to(self.device)

    def clip_codes(self, samples: np.ndarray) -> torch.Tensor:
        """A clip's codes through the voice cache: encoded at most once per tokenizer."""
        self.load()
        assert self.voice_cache is not None
        return self.voice_cache.codes(samples, self.encode_clip)

    def _clip_codes(self, clip: dict[str, Any]) -> torch.Tensor:
        return clip["codes"] if "codes" in clip else self.clip_codes(clip["audio"])

    def _delayed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (frames x codebooks) -> stream BOS + codes + EOS in the delay pattern."""
        processor = self._processor
        codes = codes.T.unsqueeze(0).to(self.device)
        bos = codes.new_full((1, codes.shape[1], 1), processor.audio_stream_bos_id)
        eos = codes.new_full((1, codes.shape[1], 1), processor.audio_stream_eos_id)
        return processor.build_delay_pattern(torch.cat([bos, codes, eos], dim=2))[0].T

    @torch.inference_mode()
    def _synthesize(
        self,
        conversation: list[dict[str, Any]],
        params: SamplingParams,
        cancel: threading.Event | None,
        on_frames: FrameCallback | None,
        decode: bool,
    ) -> Synthesis:
        """One conversation: a batch of one, its error raised."""
        result = self.synthesize_batch([Job(conversation, params, cancel, on_frames, decode)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _run_batch(self, jobs: list[Job]) -> list[Synthesis | Exception]:
        try:
            return self.synthesize_batch(jobs)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.inference_mode()
    def synthesize_batch(self, jobs: list[Job]) -> list[Synthesis | Exception]:
        """Jobs with the same sampling settings in one `generate`; a result or error per job.

        A job whose prompt cannot be built fails alone; if the batched `generate` itself
        fails, each job is run alone so that only the one at fault fails (a streaming job,
        which may have sent frames already, fails with the batch's error instead).
        """
        results: list[Synthesis | Exception] = [RuntimeError("not run")] * len(jobs)
        prepared: list[tuple[int, BatchFeature, float]] = []
        for index, job in enumerate(jobs):
            start = time.perf_counter()
            try:
                prepared.append((index, self._prepare(job.conversation), _ms_since(start)))
            except Exception as error:
                results[index] = _as_engine_error(error)
        if not prepared:
            return results
        try:
            batch = [(jobs[i], inputs, ms) for i, inputs, ms in prepared]
            for (index, _, _), result in zip(prepared, self._generate(batch), strict=True):
                results[index] = result
        except Exception as error:
            for index, inputs, ms in prepared:
                # Alone, unless it was alone already or has streamed frames it cannot take back.
                if len(prepared) == 1 or jobs[index].on_frames is not None:
                    results[index] = _as_engine_error(error)
                    continue
                try:
                    results[index] = self._generate([(jobs[index], inputs, ms)])[0]
                except Exception as single:
                    results[index] = _as_engine_error(single)
        return results

    def _generate(self, batch: list[tuple[Job, BatchFeature, float]]) -> list[Synthesis]:
        assert self.model is not None
        processor = self._processor
        params = batch[0][0].params
        inputs = self._collate([inputs for _, inputs, _ in batch])
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        torch.manual_seed(seed)
        rows = [
            _Row(job, DelayAligner(processor.audio_stream_bos_id, processor.audio_stream_eos_id))
            for job, _, _ in batch
        ]
        start = time.perf_counter()
        hook = self.model.register_forward_pre_hook(_StepTap(rows), with_kwargs=True)
        cancels = [job.cancel for job, _, _ in batch]
        try:
            sequences = self.model.generate(
                **inputs,
                generation_config=self._generation_config(params),
                stopping_criteria=StoppingCriteriaList([_Cancelled(cancels)])
                if any(cancels)
                else None,
            )
        finally:
            hook.remove()
        for row, last in zip(rows, sequences[:, -1], strict=True):
            row.take(last)  # the last step never goes through forward
        generate_ms = _ms_since(start)

        results = []
        for row, (job, row_inputs, prepare_ms) in zip(rows, batch, strict=True):
            start = time.perf_counter()
            codes = (
                torch.cat(row.frames)
                if row.frames
                else torch.zeros((0, self.model.config.num_codebooks), dtype=torch.long)
            )
            samples = self.decode_codes(codes) if job.decode else np.zeros(0, dtype=np.float32)
            results.append(
                Synthesis(
                    samples=samples,
                    sample_rate=self.sample_rate,
                    codes=codes,
                    prompt_tokens=int(row_inputs["input_ids"].shape[1]),
                    generated_tokens=row.steps,
                    seed=seed,
                    prepare_ms=prepare_ms,
                    generate_ms=generate_ms,
                    decode_ms=_ms_since(start),
                )
            )
        return results

    def _collate(self, items: list[BatchFeature]) -> BatchFeature:
        """Left-pad the text, right-pad the audio with the stream EOS (as the processor does)."""
        if len(items) == 1:
            return items[0]
        processor = self._processor
        pad_id = processor.tokenizer.pad_token_id
        text_len = max(item["input_ids"].shape[1] for item in items)
        input_ids, attention = [], []
        for item in items:
            pad = text_len - item["input_ids"].shape[1]
            ids = item["input_ids"][0]
            input_ids.append(torch.cat([ids.new_full((pad,), pad_id), ids]))
            mask = item.get("attention_mask", torch.ones_like(item["input_ids"]))[0]
            attention.append(torch.cat([mask.new_zeros(pad), mask]))
        batch = {"input_ids": torch.stack(input_ids), "attention_mask": torch.stack(attention)}
        if "audio_input_ids" in items[0]:
            audio_len = max(item["audio_input_ids"].shape[1] for item in items)
            audio, audio_mask = [], []
            for item in items:
                codes, mask = item["audio_input_ids"][0], item["audio_input_ids_mask"][0]
                pad = audio_len - codes.shape[0]
                eos = codes.new_full((pad, codes.shape[1]), processor.audio_stream_eos_id)
                audio.append(torch.cat([codes, eos]))
                audio_mask.append(torch.cat([mask, mask.new_zeros(pad)]))
            batch["audio_input_ids"] = torch.stack(audio)
            batch["audio_input_ids_mask"] = torch.stack(audio_mask)
        return BatchFeature(batch).to(self.device)

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


@dataclass
class Job:
    """One conversation to synthesise, with where its frames go and what cancels it."""

    conversation: list[dict[str, Any]]
    params: SamplingParams
    cancel: threading.Event | None = None
    on_frames: FrameCallback | None = None
    decode: bool = True


@dataclass
class _Row:
    """One job's row of a batch: its own aligner, frames and step count."""

    job: Job
    aligner: DelayAligner
    frames: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0

    def take(self, step: torch.Tensor) -> None:
        """A generated step of this row; ignored once its audio ended or it was cancelled."""
        if self.aligner.finished or (self.job.cancel is not None and self.job.cancel.is_set()):
            return
        self.steps += 1
        new = self.aligner.push(step.cpu())
        if new.shape[0]:
            self.frames.append(new)
            if self.job.on_frames is not None:
                self.job.on_frames(new)


class _StepTap:
    """Forward pre-hook that sees each generated step as the model reads it back.

    During decoding, generate feeds the model the steps it just sampled as
    `audio_input_ids[:, -1]` (one row per job); the first call is the prompt (prefill).
    """

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows
        self.calls = 0

    def __call__(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls += 1
        if self.calls > 1:
            steps = kwargs["audio_input_ids"][:, -1].cpu()
            for row, step in zip(self.rows, steps, strict=True):
                row.take(step)


class _Cancelled(StoppingCriteria):
    """Stops each row after the current step once its event is set."""

    def __init__(self, events: list[threading.Event | None]) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        flags = [event is not None and event.is_set() for event in self.events]
        return torch.tensor(flags, device=input_ids.device)


def _as_engine_error(error: Exception) -> Exception:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return OutOfMemoryError(
            "the GPU ran out of memory for this request; try a shorter text, a shorter "
            "reference clip or a smaller max_new_tokens"
        )
    return error
