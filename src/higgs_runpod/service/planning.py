"""A request to what the engine is asked for, with every check made before generation.

    SpeechRequest --split_text--> chunks (MAX_TOTAL_FRAMES checked)
        --save_voice / remember_take? a keepable take (one voice, one chunk; a free name)
        --VoiceResolver--> clips / descriptions --> GenerationPlan
    GenerationPlan (model loaded) --with_codes--> every clip with its audio codes
        (a library voice's own, else the voice cache's) --check_prompt--> MAX_PROMPT_TOKENS

Checks that need no model come before any download; those that need it (the prompt's
tokens, a take's length in frames) come once it is loaded, still before any generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from higgs_runpod.errors import RequestError
from higgs_runpod.library.manage import Encoder, VoiceService
from higgs_runpod.request.chunking import Chunk, split_text
from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.request.schema import SpeechRequest
from higgs_runpod.request.voices import ReferenceClip, ResolvedVoice, VoiceResolver
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.synthesis.longform import MakeConversation
from higgs_runpod.timing import ms_since


@dataclass(frozen=True)
class GenerationPlan:
    """What a request asks the engine for, ready to generate (not a delivery's plan: that
    is storage.Delivery)."""

    chunks: list[Chunk]
    make_conversation: MakeConversation
    params: SamplingParams
    context_chunks: int
    voice: ResolvedVoice | None = None  # what make_conversation speaks with
    speakers: dict[str, ResolvedVoice] | None = None


@dataclass(frozen=True)
class CodesSource:
    """Where a request's reference codes came from (its `voice_codes` response field)."""

    counts: dict[str, int]
    encode_ms: float  # getting them, encodes included

    @property
    def voice_encode_ms(self) -> float:
        """The timings' voice_encode: 0 when no clip went through the audio tokenizer."""
        return self.encode_ms if self.counts["encoded"] else 0.0


def new_counts() -> dict[str, int]:
    """Codes counted by where they came from: a library voice, the cache, an encode."""
    return {"library": 0, "memory": 0, "disk": 0, "encoded": 0}


class Planner:
    """Plans requests for one engine; `encoder` is the loaded model's (it loads it)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        voices: VoiceResolver,
        library: VoiceService,
        encoder: Callable[[], Encoder],
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.voices = voices
        self.library = library
        self.encoder = encoder

    async def plan(self, request: SpeechRequest) -> GenerationPlan:
        """Split the text (in a thread) and check the request's total work, then resolve
        voices (downloads on the event loop, decoding in threads): every check that needs
        no model comes before any download."""
        chunks = await asyncio.to_thread(self._chunks, request)
        if request.keeping is not None:
            await asyncio.to_thread(self._check_keepable, request, chunks)
        resolve = self.voices.resolve_async
        voice = await resolve(request.voice, "voice") if request.voice is not None else None
        speakers = None
        if request.speakers:
            speakers = {
                tag: await resolve(v, f"speakers.{tag}") for tag, v in request.speakers.items()
            }
        return _plan(request, chunks, voice, speakers)

    def _chunks(self, request: SpeechRequest) -> list[Chunk]:
        """The text's chunks, refused if they ask for more than MAX_TOTAL_FRAMES."""
        chunks = split_text(request.text, request.chunking, self.settings.max_text_chars)
        frames, limit = len(chunks) * request.max_new_tokens, self.settings.max_total_frames
        if frames > limit:
            raise RequestError(
                "max_new_tokens",
                f"{len(chunks)} chunks x {request.max_new_tokens} ask for up to {frames} audio "
                f"frames; a request may ask for at most {limit} (MAX_TOTAL_FRAMES, 40 ms each): "
                "lower max_new_tokens or send less text",
            )
        return chunks

    def _check_keepable(self, request: SpeechRequest, chunks: list[Chunk]) -> None:
        """Refuse, before any download or generation, a take that could not be kept (named
        by the field that asks to keep it: save_voice or remember_take)."""
        field = request.keeping
        assert field is not None
        if request.speakers is not None or len(request.speaker_tags) > 1:
            raise RequestError(field, "only a single-voice take can be kept (no speakers)")
        if len(chunks) != 1:
            raise RequestError(
                field, f"the text makes {len(chunks)} chunks; only a single-chunk take can be kept"
            )
        save = request.save_voice
        if save is not None:
            self.library.check_new(save.name, save.consent, save.overwrite, "save_voice.name")

    def with_codes(self, clip: ReferenceClip, counts: dict[str, int]) -> ReferenceClip:
        """The clip with its codes: a library voice's own, else from the voice cache (which
        encodes on a miss). A library voice without codes gets them written into it."""
        encoder = self.encoder()
        codes = self.library.stored_codes(clip, encoder)
        if codes is not None:
            counts["library"] += 1
        elif clip.library is not None and clip.library.directory is not None:
            codes = encoder.encode(clip.samples)
            counts["encoded"] += 1
            self.library.store.save_codes(clip.library, codes, encoder.tokenizer_id)
        else:
            cache = self.engine.voice_cache
            assert cache is not None
            codes, source = cache.lookup(clip.samples, encoder.encode)
            counts[source] += 1
        return replace(clip, codes=codes)

    def with_all_codes(
        self, plan: GenerationPlan, request: SpeechRequest
    ) -> tuple[GenerationPlan, CodesSource]:
        """Every reference clip of the plan with its codes, and how they were had; a kept
        take's length bounded by MAX_REF_AUDIO_SECONDS (the model is loaded by now)."""
        counts = new_counts()
        started = time.perf_counter()

        def attach(voice: ResolvedVoice | None) -> Any:
            return self.with_codes(voice, counts) if isinstance(voice, ReferenceClip) else voice

        speakers = {tag: attach(v) for tag, v in plan.speakers.items()} if plan.speakers else None
        coded = _plan(request, plan.chunks, attach(plan.voice), speakers)
        codes = CodesSource(counts, ms_since(started))
        if request.keeping is None:
            return coded, codes
        limit = self.settings.max_ref_audio_seconds
        frames = int(limit * self.engine.frame_rate)
        if "max_new_tokens" in request.model_fields_set and request.max_new_tokens > frames:
            raise RequestError(
                "max_new_tokens",
                f"must be at most {frames} with {request.keeping}: a kept take is at most "
                f"{limit:g} s (MAX_REF_AUDIO_SECONDS)",
            )
        params = replace(coded.params, max_new_tokens=min(coded.params.max_new_tokens, frames))
        return replace(coded, params=params), codes

    def check_prompt(self, plan: GenerationPlan) -> None:
        """Refuse a chunk whose prompt (before context chunks) is over MAX_PROMPT_TOKENS.

        Only the chunk with the most text (in UTF-8 bytes, which bound its tokens) is
        measured: the rest of every chunk's prompt (system, scene, voices) is the same.
        """
        index, chunk = max(
            enumerate(plan.chunks), key=lambda item: len(item[1].text.encode("utf-8"))
        )
        inputs = self.engine.prompt_inputs(plan.make_conversation(chunk.text, []))
        tokens, limit = int(inputs["input_ids"].shape[-1]), self.settings.max_prompt_tokens
        if tokens > limit:
            raise RequestError(
                "text",
                f"the prompt of chunk {index + 1} is {tokens} tokens (its text, the scene and "
                f"the voices' reference audio); the limit is {limit} (MAX_PROMPT_TOKENS)",
            )


def _plan(
    request: SpeechRequest,
    chunks: list[Chunk],
    voice: ResolvedVoice | None,
    speakers: dict[str, ResolvedVoice] | None,
) -> GenerationPlan:
    """Fix what generation needs."""

    def make_conversation(text: str, history: Any) -> list[dict[str, Any]]:
        return build_conversation(
            text, scene=request.scene, voice=voice, speakers=speakers, history=history
        )

    return GenerationPlan(
        chunks=chunks,
        make_conversation=make_conversation,
        voice=voice,
        speakers=speakers,
        params=SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            max_new_tokens=request.max_new_tokens,
            ras_win_len=request.ras_win_len,
            ras_win_max_num_repeat=request.ras_win_max_num_repeat,
        ),
        context_chunks=request.chunking.context_chunks,
    )
