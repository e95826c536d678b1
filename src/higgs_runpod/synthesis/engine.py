"""The model behind a small interface: load once, then conversation in, codes out; codes to
waveform on request.

Built on transformers' native Higgs Audio v2 classes, loaded by `loading`; the prompt is
rendered by `prompts.render_prompt`.

    conversation --chat template--> text + reference codes --prefill (model forward, after
    the beginning the prompt cache holds)--> KV-cache slot --decode steps, batched with
    every other request (scheduler, slots)--> delayed steps --DelayAligner--> codes
    (frames x codebooks) --audio tokenizer--> samples

All model work runs on one thread, the decode loop's (scheduler.DecodeLoop): callers on
other threads block on their own request while it decodes among the others. Tensor work
on a second thread would also start a second OpenMP thread team, and on a small CPU the
loop's steps then run at about half speed for the rest of the process.

Audio in a conversation is either a waveform (`{"type": "audio", "audio": samples}`,
encoded here) or codes already (`{"type": "audio", "codes": tensor}`), which is how long
texts carry earlier chunks as context without re-encoding them.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
from transformers import (
    BatchFeature,
    HiggsAudioV2ForConditionalGeneration,
    HiggsAudioV2Processor,
    HiggsAudioV2TokenizerModel,
)

from higgs_runpod.errors import ModelNotFoundError, RequestError
from higgs_runpod.request.prompts import render_prompt
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.loading import load_checkpoints, resolve_device
from higgs_runpod.synthesis.prompt_cache import PromptCache, PromptForward
from higgs_runpod.synthesis.sampler import (
    ALL_FEATURES,
    AudioVocab,
    Features,
    SamplingParams,
    features_of,
    sample,
)
from higgs_runpod.synthesis.scheduler import Decoded, DecodeLoop, Request
from higgs_runpod.synthesis.slots import DecodeState, GraphedSteps, SlotCache, decode_step
from higgs_runpod.synthesis.streaming import DelayAligner, receptive_field_frames
from higgs_runpod.synthesis.voice_cache import VoiceCache
from higgs_runpod.timing import ms_since

__all__ = ["Engine", "FrameCallback", "SamplingParams", "Synthesis"]

log = logging.getLogger(__name__)

FrameCallback = Callable[[torch.Tensor], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Synthesis:
    """What one conversation generated: its codes (`Engine.decode_codes` makes them audio)."""

    codes: torch.Tensor  # (frames, codebooks), on the CPU
    prompt_tokens: int
    generated_tokens: int
    seed: int
    prepare_ms: float
    generate_ms: float

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


class Engine:
    """One model per worker process; any number of threads may call `synthesize` at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device, self.dtype = resolve_device(settings.device, settings.dtype)
        self.model: HiggsAudioV2ForConditionalGeneration | None = None
        self.processor: HiggsAudioV2Processor | None = None
        self.decoder_context_frames = 0  # frames each side that one frame's audio depends on
        self.voice_cache: VoiceCache | None = None
        self.slots = 0
        self.context = 0
        self.cuda_graphs = False
        self.prompt_cache = PromptCache(0)
        self._loop = DecodeLoop()
        self._load_lock = threading.Lock()
        self._step: Callable[..., None] | None = None

    @property
    def running(self) -> int:
        """Requests holding a KV-cache slot now."""
        return self._loop.running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self._loop.waiting

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    @property
    def sample_rate(self) -> int:
        return int(self._audio_tokenizer.config.sample_rate)

    @property
    def frame_rate(self) -> float:
        config = self._audio_tokenizer.config
        return config.sample_rate / config.hop_length

    @property
    def _audio_tokenizer(self) -> HiggsAudioV2TokenizerModel:
        # ProcessorMixin sets its parts as attributes that its type hints do not declare.
        return self._processor.audio_tokenizer  # type: ignore[attr-defined]

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
                self._loop.call(self._load)
        return time.perf_counter() - start

    def _load(self) -> None:
        loaded = load_checkpoints(self.settings, self.device, self.dtype)
        self.processor, self.voice_cache = loaded.processor, loaded.voice_cache
        self._attach(loaded.model)
        self.decoder_context_frames = receptive_field_frames(
            self.decode_codes, loaded.model.config.num_codebooks
        )
        log.info("model loaded: %s parameters", f"{loaded.model.num_parameters():,}")

    def use_model(self, model: HiggsAudioV2ForConditionalGeneration) -> None:
        """Decode with a model built in memory, without checkpoints or processor: only
        `decode` works then (bench/throughput.py runs the released shape this way)."""
        with self._load_lock:
            self._loop.call(lambda: self._attach(model))

    def _attach(self, model: HiggsAudioV2ForConditionalGeneration) -> None:
        self._allocate(model)
        self.model = model
        self._loop.attach(self)

    def _allocate(self, model: HiggsAudioV2ForConditionalGeneration) -> None:
        """The KV-cache slots and decode state, sized by the settings and the memory budget."""
        config = model.config
        self.vocab = AudioVocab(
            num_codebooks=config.num_codebooks,
            codebook_size=config.codebook_size,
            stream_bos=config.audio_stream_bos_id,
            stream_eos=config.audio_stream_eos_id,
            audio_bos_token=config.audio_bos_token_id,
            audio_delay_token=config.audio_delay_token_id,
        )
        self.context = min(self.settings.max_context_tokens, config.max_position_embeddings)
        per_token = SlotCache.bytes_per_token(config, self.dtype)
        budget = self.settings.kv_cache_tokens or self._free_memory_tokens(per_token)
        self.slots = min(self.settings.max_batch_size, budget // self.context)
        if self.slots < 1:
            raise ModelNotFoundError(
                f"the KV-cache budget ({budget} tokens) cannot hold one {self.context}-token "
                "context: lower MAX_CONTEXT_TOKENS, or raise KV_CACHE_MEMORY_FRACTION or "
                "KV_CACHE_TOKENS"
            )
        log.info("KV cache: budget %d tokens; %d slots x %d tokens = %d tokens (%.2f GiB)",
                 budget, self.slots, self.context, self.slots * self.context,
                 self.slots * self.context * per_token / 2**30)  # fmt: skip
        self._cache = SlotCache(config, self.slots, self.context, self.dtype, self.device)
        self.prompt_cache = PromptCache(
            min(self.settings.prompt_cache_tokens, budget - self.slots * self.context)
        )
        log.info("prompt cache: %d tokens", self.prompt_cache.max_tokens)
        self._state = DecodeState.allocate(self.slots, self.vocab, self.device)

        def eager(rows: int, length: int, features: Features = ALL_FEATURES) -> None:
            decode_step(model, self._cache, self._state, self.vocab, rows, length, features)

        self._step = eager
        self.cuda_graphs = False
        if self.device.type == "cuda" and self.settings.cuda_graphs:
            try:
                graphs = GraphedSteps(eager, self._state, self.slots, self.context)
                graphs.capture()
                self._step, self.cuda_graphs = graphs, True
                log.info("decode step captured as %d CUDA graphs", len(graphs.graphs))
            except Exception as error:  # any capture failure: decode eagerly instead
                log.warning("CUDA graph capture failed (%s); decoding eagerly", error)

    def _free_memory_tokens(self, per_token: int) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(free * self.settings.kv_cache_memory_fraction) // per_token

    def synthesize(
        self,
        conversation: list[dict[str, Any]],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        on_frames: FrameCallback | None = None,
    ) -> Synthesis:
        """Generate speech for one conversation (see prompts.build_conversation).

        `on_frames` receives each batch of newly completed frames (frames x codebooks) from
        the decode thread as soon as every codebook has them; setting `cancel` stops
        generation at the next step. The result holds what was generated until then.
        """
        self.load()
        seed = params.seed if params.seed is not None else random.randrange(2**32)
        decoded = self.decode(lambda: self._prepare(conversation), replace(params, seed=seed),
                              cancel=cancel, on_frames=on_frames)  # fmt: skip
        empty = torch.zeros((0, self.vocab.num_codebooks), dtype=torch.long)
        codes = torch.cat(decoded.frames) if decoded.frames else empty
        return Synthesis(
            codes=codes,
            prompt_tokens=decoded.prompt_tokens,
            generated_tokens=decoded.steps,
            seed=seed,
            prepare_ms=decoded.prepare_ms,
            generate_ms=decoded.generate_ms,
        )

    def decode(
        self,
        prepare: Callable[[], BatchFeature],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        on_frames: FrameCallback | None = None,
    ) -> Decoded:
        """Decode one prompt among the other requests. `prepare` makes its model inputs;
        it runs on the model thread when the request gets its slot."""
        request = Request(
            prepare=prepare,
            settings=params,
            aligner=DelayAligner(self.vocab.stream_bos, self.vocab.stream_eos),
            cancel=cancel,
            on_frames=on_frames,
        )
        return self._loop.submit(request)

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the model thread, between decode steps (tests and benchmarks
        use it to run the model directly)."""
        return self._loop.call(function)

    def prompt_inputs(self, conversation: list[dict[str, Any]]) -> BatchFeature:
        """The model inputs of a conversation's prompt (what `generate` would be given)."""
        self.load()
        return self._loop.call(lambda: self._prepare(conversation))

    def encode_clip(self, samples: np.ndarray) -> torch.Tensor:
        """A reference clip (float32 mono at sample_rate) -> codes (frames x codebooks)."""
        return self._loop.call(lambda: self._encode_clip(samples))

    def _encode_clip(self, samples: np.ndarray) -> torch.Tensor:
        processor = self._processor
        features = processor.feature_extractor(
            samples, sampling_rate=self.sample_rate, return_tensors="pt"
        )
        with torch.inference_mode():
            input_values = features["input_values"].to(self.device)
            codes = self._audio_tokenizer.encode(input_values).audio_codes
        return codes[0].T.cpu()

    def decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        """Codes (frames x codebooks) -> float32 mono samples."""
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        return self._loop.call(lambda: self._decode_codes(codes))

    def _decode_codes(self, codes: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            tokens = codes.T.unsqueeze(0).to(self.device)
            audio = self._audio_tokenizer.decode(tokens)
            return audio.audio_values.float().reshape(-1).cpu().numpy()

    def clip_codes(self, samples: np.ndarray) -> torch.Tensor:
        """A clip's codes through the voice cache: encoded at most once per tokenizer."""
        self.load()
        assert self.voice_cache is not None
        return self.voice_cache.codes(samples, self.encode_clip)

    def _prepare(self, conversation: list[dict[str, Any]]) -> BatchFeature:
        return render_prompt(self._processor, conversation, self.clip_codes, self.device)

    # What the decode loop calls (scheduler.Backend), always on its thread.

    def prefill(self, admitted: list[tuple[Request, int]]) -> list[torch.Tensor | Exception]:
        """Run the prompts through the model's own forward (the masked text + audio path),
        from where the prompt cache's shared beginnings end, as few forwards as the cache
        can batch them into; keep each one's keys and values in its slot and sample its
        first step. A request whose prompt is refused gets its error back and the others go
        on; anything raised later fails the batch, which the loop then runs one by one."""
        assert self.model is not None
        outcomes: dict[int, torch.Tensor | Exception] = {}
        ready: list[tuple[int, Request, int, BatchFeature]] = []
        for index, (request, slot) in enumerate(admitted):
            try:
                ready.append((index, request, slot, self._prompt(request)))
            except torch.OutOfMemoryError:
                raise  # the loop frees memory and tries each request alone
            except Exception as error:
                outcomes[index] = error
        forwards = self.prompt_cache.forward(self.model, [inputs for *_, inputs in ready])
        for (index, request, slot, inputs), prompt in zip(ready, forwards, strict=True):
            outcomes[index] = self._first_step(request, slot, inputs, prompt)
        return [outcomes[index] for index in range(len(admitted))]

    def _prompt(self, request: Request) -> BatchFeature:
        """A request's model inputs, refused if its prompt and max_new_tokens overrun a slot."""
        started = time.perf_counter()
        inputs = request.prepare()
        request.prompt_tokens = int(inputs["input_ids"].shape[1])
        request.prepare_ms = ms_since(started)
        request.started = time.perf_counter()
        limit = request.prompt_tokens + request.settings.max_new_tokens
        if limit > self.context:
            raise RequestError(
                "max_new_tokens",
                f"the prompt ({request.prompt_tokens} tokens: text, reference audio and "
                f"context) plus max_new_tokens ({request.settings.max_new_tokens}) exceeds the "
                f"{self.context} tokens a request may use on this worker (MAX_CONTEXT_TOKENS)",
            )
        return inputs

    def _first_step(
        self, request: Request, slot: int, inputs: BatchFeature, prompt: PromptForward
    ) -> torch.Tensor:
        """Keys and values into `slot`, sampling state loaded, the first step sampled."""
        self._cache.fill(slot, prompt.cache)
        audio = inputs.get("audio_input_ids")
        sampling = self._state.sampling
        sampling.load(slot, request.settings, self.vocab, inputs["input_ids"][0].cpu(),
                      audio[0] if audio is not None else None)  # fmt: skip
        features = features_of([request.settings], self.vocab)
        first = sample(sampling.rows(slot, slot + 1), prompt.logits, self.vocab, features)[0]
        self._state.codes[slot] = first[:-1]
        self._state.positions[slot] = request.prompt_tokens
        return first

    def step(self, rows: int, length: int, settings: list[SamplingParams]) -> torch.Tensor:
        assert self._step is not None
        if self.cuda_graphs:
            self._step(rows, length)  # graphs run every feature: one graph serves any mix
        else:
            self._step(rows, length, features_of(settings, self.vocab))
        return self._state.readback[:rows]

    def activate(self, slot: int) -> None:
        self._state.active[slot] = True

    def deactivate(self, slot: int) -> None:
        self._state.active[slot] = False

    def release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
