"""The speech service: a validated request to audio bytes and metadata, for every front.

    SpeechRequest --Planner (planning.py)--> GenerationPlan, model loaded, codes attached
        --generate: longform + engine, on a job thread--> codes (frames as they complete)
        --speak: decode, encode the whole file--> Speech
        --stream: PieceDecoder + ProgressiveEncoder as frames come--> Piece ... StreamEnd

Threads: the event loop plans and awaits; each generating request blocks one thread of
`_generation_threads` (MAX_BATCH_SIZE of them) while the engine's own decode thread runs it
among the others; decoding and encoding run in asyncio's threads.

Stopping a request early has one mechanism, the engine's cancel event, checked at every
decode step. A front whose caller went away sets it (`cancel`: the HTTP routes and the
WebSocket session, on a disconnect); cancelling the awaiting task sets it too (`generate`),
which is how RunPod's job cancel and REQUEST_TIMEOUT_S (deadline.py) stop generation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from higgs_runpod.errors import RequestError
from higgs_runpod.library.manage import Encoder, VoiceService
from higgs_runpod.library.store import list_library
from higgs_runpod.library.takes import new_take_id
from higgs_runpod.request.prompts import normalize_text
from higgs_runpod.request.schema import SpeechRequest, VoiceFields
from higgs_runpod.request.voices import VoiceDescription, VoiceResolver
from higgs_runpod.service.planning import CodesSource, GenerationPlan, Planner, new_counts
from higgs_runpod.service.results import (
    FrameCounter,
    Piece,
    PieceCounter,
    Progress,
    Speech,
    StreamEnd,
    encode_whole,
    summary,
)
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.synthesis.longform import LongSynthesis, synthesize_chunks
from higgs_runpod.synthesis.progressive import ProgressiveEncoder
from higgs_runpod.synthesis.streaming import PieceDecoder, decode_as_streamed
from higgs_runpod.timing import ms_since

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A request ready to generate, and what getting it ready took."""

    plan: GenerationPlan
    codes: CodesSource
    resolve_ms: float  # planning
    load_ms: float  # waiting for the model

    def timings(self, synthesis: LongSynthesis) -> dict[str, float]:
        """The timings every response has; speak and stream add their own after these."""
        return {
            "load": self.load_ms,
            "prepare": self.resolve_ms + self.codes.encode_ms + synthesis.prepare_ms,
            "voice_encode": self.codes.voice_encode_ms,
            "generate": synthesis.generate_ms,
        }


class SpeechService:
    """Everything a request needs, built once per process from the settings."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.voices = VoiceResolver(settings)
        self.library = VoiceService(settings, self.voices, self._encoder)
        self.planner = Planner(settings, self.engine, self.voices, self.library, self._encoder)
        # One thread per request that may be generating at once: each blocks on its own
        # request while the engine's decode loop runs it among the others (asyncio's
        # default pool has only cores + 4 threads).
        self._generation_threads = ThreadPoolExecutor(
            max_workers=settings.max_batch_size, thread_name_prefix="job"
        )

    def _encoder(self) -> Encoder:
        self.engine.load()
        cache = self.engine.voice_cache
        assert cache is not None
        return Encoder(self.engine.encode_clip, cache.tokenizer_id, cache.shape)

    def warm_voices(self) -> int:
        """Give every library voice its codes now, so no request encodes one; returns how
        many had to be encoded. A voice that cannot be read is logged and skipped."""
        counts = new_counts()
        for entry in list_library(self.settings.voices_path):
            try:
                clip = self.voices.library_clip(entry, "voice")
            except RequestError as error:
                log.warning("library voice %s skipped: %s", entry.name, error.message)
                continue
            self.planner.with_codes(clip, counts)
        return counts["encoded"]

    def forget(self, samples: Any) -> None:
        """Drop a deleted voice's codes from the voice cache (VoiceService.delete's hook)."""
        if self.engine.voice_cache is not None:
            self.engine.voice_cache.forget(samples)

    async def speak(
        self,
        request: SpeechRequest,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        take_id: str | None = None,
    ) -> Speech:
        """A validated request to encoded audio; the model runs off the event loop.
        `take_id`: the id a remembered take gets (default a new one)."""
        started = time.perf_counter()
        ready = await self.prepare(request)
        counter = FrameCounter(progress, len(ready.plan.chunks))
        synthesis = await self.generate(ready.plan, counter.frames, counter.chunk, cancel)
        decode_start = time.perf_counter()
        samples = await asyncio.to_thread(self._decode, synthesis.codes)
        decode_ms = ms_since(decode_start)
        extra = await self._extra(request, ready, synthesis, samples, take_id)
        encode_start = time.perf_counter()
        encoded, duration_s = await asyncio.to_thread(
            encode_whole, samples, self.engine.sample_rate, request
        )
        timings = {**ready.timings(synthesis), "decode": decode_ms,
                   "encode": ms_since(encode_start), "total": ms_since(started)}  # fmt: skip
        return Speech(
            audio=encoded,
            format=request.format,
            sample_rate=request.sample_rate,
            duration_s=duration_s,
            synthesis=synthesis,
            frame_rate=self.engine.frame_rate,
            extra=extra,
            timings_ms=timings,
        )

    async def stream(
        self,
        request: SpeechRequest,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        take_id: str | None = None,
    ) -> AsyncGenerator[Piece | StreamEnd, None]:
        """Audio pieces as frames complete, then a StreamEnd with usage and timings (and,
        with remember_take, the take's id: `take_id`, else a new one)."""
        started = time.perf_counter()
        ready = await self.prepare(request)
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[torch.Tensor | None] = asyncio.Queue()
        counter = FrameCounter(progress, len(ready.plan.chunks))

        def on_frames(frames: torch.Tensor) -> None:
            counter.frames(frames)
            loop.call_soon_threadsafe(arrived.put_nowait, frames)

        generation = asyncio.ensure_future(
            self.generate(ready.plan, on_frames, counter.chunk, cancel)
        )
        generation.add_done_callback(lambda _: arrived.put_nowait(None))
        encoder = ProgressiveEncoder(
            request.format, self.engine.sample_rate, request.sample_rate, request.speed
        )
        pieces = PieceCounter(request, self._hop, started)
        try:
            async for piece in self._pieces(arrived, generation, encoder, pieces):
                yield piece
        finally:
            if not generation.done():
                generation.cancel()
        synthesis = generation.result()
        samples = None
        if request.keeping is not None:
            samples = await asyncio.to_thread(self._decode, synthesis.codes)
        extra = await self._extra(request, ready, synthesis, samples, take_id)
        timings = {**ready.timings(synthesis), "first_audio": pieces.first_audio_ms or 0.0,
                   "total": ms_since(started)}  # fmt: skip
        duration_s = encoder.samples_out / request.sample_rate
        metadata = summary(synthesis, request.format, request.sample_rate, duration_s, timings,
                           self.engine.frame_rate)  # fmt: skip
        yield StreamEnd(pieces.index, {**metadata, **extra})

    async def _pieces(
        self,
        arrived: asyncio.Queue[torch.Tensor | None],
        generation: asyncio.Future[LongSynthesis],
        encoder: ProgressiveEncoder,
        pieces: PieceCounter,
    ) -> AsyncGenerator[Piece, None]:
        """Frames to encoded pieces as they arrive; once generation ends (its error raised
        here), the rest without right context, and the encoder's tail."""
        engine, hop = self.engine, self._hop
        decoder = PieceDecoder(engine.decode_codes, engine.decoder_context_frames, hop)
        first, later = self.settings.stream_first_frames, self.settings.stream_piece_frames
        while (frames := await arrived.get()) is not None:
            decoder.push(frames)
            while decoder.ready() >= (size := decoder.next_size(first, later)):
                samples = await asyncio.to_thread(decoder.take, size)
                data = await asyncio.to_thread(encoder.feed, samples)
                if (item := pieces.add(data, len(samples))) is not None:
                    yield item
        await generation
        while decoder.pending or not encoder.finished:
            size = decoder.next_size(first, later)
            samples = await asyncio.to_thread(decoder.take, size, True)
            data = await asyncio.to_thread(encoder.feed, samples)
            if not decoder.pending:
                data += await asyncio.to_thread(encoder.finish)
            if (item := pieces.add(data, len(samples))) is not None:
                yield item

    async def generate(
        self,
        plan: GenerationPlan,
        on_frames: Callable[[torch.Tensor], None] | None,
        on_chunk: Callable[[int], None] | None,
        cancel: threading.Event | None = None,
        history: Sequence[tuple[str, torch.Tensor]] = (),
    ) -> LongSynthesis:
        """Generate off the event loop; a cancelled request stops within a step.

        `cancel` set (GenerationCancelled from longform), or this task cancelled
        (CancelledError here, which sets it): see the module docstring.
        """
        cancel = cancel or threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._generation_threads, partial(
                    synthesize_chunks, self.engine, plan.chunks, plan.make_conversation,
                    plan.params, plan.context_chunks, cancel=cancel, on_frames=on_frames,
                    on_chunk=on_chunk, history=history,
                ),
            )  # fmt: skip
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def prepare(self, request: SpeechRequest) -> Prepared:
        """The request planned, the model loaded, the clips' codes had and the prompt
        checked, before any generation (speak, stream, and a WebSocket session's config)."""
        started = time.perf_counter()
        plan = await self.planner.plan(request)
        resolve_ms = ms_since(started)
        load_ms = await asyncio.to_thread(self.engine.load) * 1000.0
        plan, codes = await asyncio.to_thread(self.planner.with_all_codes, plan, request)
        await asyncio.to_thread(self.planner.check_prompt, plan)
        return Prepared(plan, codes, resolve_ms, load_ms)

    def _decode(self, codes: torch.Tensor) -> Any:
        """Samples of a whole clip, decoded in the pieces its stream would have had, so that
        a stream of the same request joins into the same file (see streaming.py)."""
        return decode_as_streamed(
            self.engine.decode_codes, self.engine.decoder_context_frames, self._hop, codes,
            self.settings.stream_first_frames, self.settings.stream_piece_frames,
        )  # fmt: skip

    @property
    def _hop(self) -> int:
        return int(self.engine.sample_rate / self.engine.frame_rate)

    async def _extra(
        self,
        request: SpeechRequest,
        ready: Prepared,
        synthesis: LongSynthesis,
        samples: Any,
        take_id: str | None,
    ) -> dict[str, Any]:
        """The response's voice fields: where the codes came from, the kept take, and the
        remembered one's id."""
        extra: dict[str, Any] = {"voice_codes": ready.codes.counts}
        if request.save_voice is not None:
            extra["saved_voice"] = await asyncio.to_thread(
                self._keep_take, request, synthesis, samples
            )
        if request.remember_take:
            voice = ready.plan.voice
            description = voice.text if isinstance(voice, VoiceDescription) else None
            take_id = take_id or new_take_id()
            await asyncio.to_thread(
                self.library.remember, take_id, samples, normalize_text(request.text),
                description, synthesis.codes,
            )  # fmt: skip
            extra["take_id"] = take_id
        return extra

    def _keep_take(self, request: SpeechRequest, synthesis: LongSynthesis, samples: Any) -> Any:
        """The take as a library voice: its audio as the clip, its codes as they are."""
        save = request.save_voice
        assert save is not None
        fields = VoiceFields(
            name=save.name,
            transcript=normalize_text(request.text),
            description=save.description,
            consent=save.consent,
            overwrite=save.overwrite,
        )
        voice = self.library.add(
            save.name, samples, fields, source="take", field="save_voice", codes=synthesis.codes
        )
        return voice.public()
