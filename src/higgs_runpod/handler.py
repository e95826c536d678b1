"""The RunPod handlers: a job's `input` in, speech out.

    input --schema.parse_request--> SpeechRequest --voices--> clips / descriptions
          --chunking--> chunks --longform + engine (off the event loop)--> codes
          --decode--> samples --progressive (speed, rate, format)--> Speech
          --storage (inline base64 or S3 upload)--> response (or streamed pieces)

`handler` returns one JSON object per job. `stream_handler` (ENABLE_STREAMING) is an
async generator, which is what RunPod needs to stream: `stream: true` jobs yield audio
pieces and a final summary; other jobs yield their single response object.

Every failure becomes RunPod's failed-job shape `{"error": "..."}` here and nowhere else:
request errors name the field and the limit; internal errors give a short message and
log the detail. The worker keeps serving after either.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch

from . import audio
from .chunking import Chunk, split_text
from .engine import Engine, SamplingParams
from .errors import HiggsRunpodError, RequestError, RequestTimeout
from .longform import LongSynthesis, MakeConversation, synthesize_chunks
from .progressive import ProgressiveEncoder
from .prompts import build_conversation
from .schema import SpeechRequest, parse_request
from .settings import Settings, load_settings
from .storage import Storage
from .streaming import PieceDecoder, decode_as_streamed
from .voices import ReferenceClip, ResolvedVoice, VoiceResolver, list_library

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Speech:
    """Encoded audio for one request, with what the caller may want to know about it."""

    audio: bytes
    format: str
    sample_rate: int
    duration_s: float
    synthesis: LongSynthesis
    timings_ms: dict[str, float]
    frame_rate: float

    def metadata(self) -> dict[str, Any]:
        """Every response field except the audio itself (see the README's response table)."""
        return _summary(self.synthesis, self.format, self.sample_rate, self.duration_s,
                        self.timings_ms, self.frame_rate)  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What a request asks the engine for, ready to generate."""

    chunks: list[Chunk]
    make_conversation: MakeConversation
    params: SamplingParams
    context_chunks: int


class Worker:
    """Everything a job needs, built once per process from the settings."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.voices = VoiceResolver(settings)
        self.storage = Storage(settings)
        # One thread per job that may be generating at once: each blocks on its own request
        # while the engine's decode loop runs it among the others (asyncio's default pool
        # has only cores + 4 threads).
        self._generation_threads = ThreadPoolExecutor(
            max_workers=settings.max_batch_size, thread_name_prefix="job"
        )

    async def on_engine_thread(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking engine call (load, decode) off the event loop; the engine does the
        model work itself, on its decode thread."""
        return await asyncio.to_thread(function, *args, **kwargs)

    def warm_voices(self) -> int:
        """Encode every library voice into the voice cache now, so no request pays for it;
        returns how many were encoded. A voice that cannot be read is logged and skipped."""
        warmed = 0
        for entry in list_library(self.settings.voices_path):
            try:
                clip = self.voices.resolve(entry.name, "voice")
            except RequestError as error:
                log.warning("library voice %s skipped: %s", entry.name, error.message)
                continue
            if isinstance(clip, ReferenceClip):
                self.engine.clip_codes(clip.samples)
                warmed += 1
        return warmed

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job to a single response; never raises (RunPod would send a traceback)."""
        try:
            request = parse_request(job.get("input"), self.settings)
            if request.stream:
                raise RequestError(
                    "stream", "this endpoint streams only when started with ENABLE_STREAMING=true"
                )
            return await self._in_time(self._respond(job, request))
        except Exception as error:
            return {"error": _message(error, job)}

    async def handle_stream(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one job as a stream of outputs; errors end it with `{"error": ...}`."""
        try:
            request = parse_request(job.get("input"), self.settings)
            if request.stream:
                pieces = self.stream(request, progress=_progress_reporter(job))
                async for item in within(self.settings.request_timeout_s, pieces):
                    yield item
            else:
                yield await self._in_time(self._respond(job, request))
        except Exception as error:
            yield {"error": _message(error, job)}

    async def _in_time(self, work: Awaitable[T]) -> T:
        """`work` within REQUEST_TIMEOUT_S; past it, it is cancelled (generation stops at
        the next step, see `_generate`) and `RequestTimeout` raised."""
        timeout_s = self.settings.request_timeout_s
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if deadline.expired():
                raise RequestTimeout(timeout_s) from None
            raise

    async def _respond(self, job: dict[str, Any], request: SpeechRequest) -> dict[str, Any]:
        """One job's complete response: the audio delivered inline or to S3, and metadata."""
        # RunPod passes s3Config at the top level of the job, beside input.
        # A caller's endpointUrl is looked up and judged (outbound.py): a thread, not the loop.
        delivery = await asyncio.to_thread(self.storage.plan, request.output, job.get("s3Config"))
        speech = await self.speak(request, progress=_progress_reporter(job))
        delivered = await self.storage.deliver(delivery, speech.audio, speech.format, job.get("id"))
        return {**delivered, **speech.metadata()}

    async def speak(
        self,
        request: SpeechRequest,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> Speech:
        """A validated request to encoded audio; the model runs off the event loop.

        `cancel` lets a front whose caller went away stop the generation (see Engine).
        """
        started = time.perf_counter()
        plan, resolve_ms, load_ms = await self._ready(request)
        counter = _FrameCounter(progress, len(plan.chunks))
        synthesis = await self.generate(plan, counter.frames, counter.chunk, cancel)
        decode_start = time.perf_counter()
        samples = await self.on_engine_thread(self._decode, synthesis.codes)
        decode_ms = _ms_since(decode_start)
        encode_start = time.perf_counter()
        encoded, duration_s = await asyncio.to_thread(
            _encode, samples, self.engine.sample_rate, request
        )
        return Speech(
            audio=encoded,
            format=request.format,
            sample_rate=request.sample_rate,
            duration_s=duration_s,
            synthesis=synthesis,
            frame_rate=self.engine.frame_rate,
            timings_ms={
                "load": load_ms,
                "prepare": resolve_ms + synthesis.prepare_ms,
                "generate": synthesis.generate_ms,
                "decode": decode_ms,
                "encode": _ms_since(encode_start),
                "total": _ms_since(started),
            },
        )

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

    async def stream(
        self,
        request: SpeechRequest,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Audio pieces as frames complete, then a summary with usage and timings."""
        started = time.perf_counter()
        plan, resolve_ms, load_ms = await self._ready(request)
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[torch.Tensor | None] = asyncio.Queue()
        counter = _FrameCounter(progress, len(plan.chunks))

        def on_frames(frames: torch.Tensor) -> None:
            counter.frames(frames)
            loop.call_soon_threadsafe(arrived.put_nowait, frames)

        generation = asyncio.ensure_future(self.generate(plan, on_frames, counter.chunk, cancel))
        generation.add_done_callback(lambda _: arrived.put_nowait(None))
        hop = self._hop
        decoder = PieceDecoder(self.engine.decode_codes, self.engine.decoder_context_frames, hop)
        encoder = ProgressiveEncoder(
            request.format, self.engine.sample_rate, request.sample_rate, request.speed
        )
        pieces = _Pieces(request, hop)
        first, later = self.settings.stream_first_frames, self.settings.stream_piece_frames
        try:
            while (frames := await arrived.get()) is not None:
                decoder.push(frames)
                while decoder.ready() >= (size := decoder.next_size(first, later)):
                    samples = await asyncio.to_thread(decoder.take, size)
                    data = await asyncio.to_thread(encoder.feed, samples)
                    if (item := pieces.add(data, len(samples), started)) is not None:
                        yield item
            synthesis = await generation
            while decoder.pending or not encoder.finished:
                size = decoder.next_size(first, later)
                samples = await asyncio.to_thread(decoder.take, size, True)
                data = await asyncio.to_thread(encoder.feed, samples)
                if not decoder.pending:
                    data += await asyncio.to_thread(encoder.finish)
                if (item := pieces.add(data, len(samples), started)) is not None:
                    yield item
        finally:
            if not generation.done():
                generation.cancel()
        timings = {"load": load_ms, "prepare": resolve_ms + synthesis.prepare_ms,
                   "generate": synthesis.generate_ms, "first_audio": pieces.first_audio_ms or 0.0,
                   "total": _ms_since(started)}  # fmt: skip
        duration_s = encoder.samples_out / request.sample_rate
        yield {"done": True, "pieces": pieces.index,
               **_summary(synthesis, request.format, request.sample_rate, duration_s, timings,
                          self.engine.frame_rate)}  # fmt: skip

    async def generate(
        self,
        plan: Plan,
        on_frames: Callable[[torch.Tensor], None] | None,
        on_chunk: Callable[[int], None] | None,
        cancel: threading.Event | None = None,
        history: Sequence[tuple[str, torch.Tensor]] = (),
    ) -> LongSynthesis:
        """Generate off the event loop; a cancelled job stops generation within a step.

        Cancelling comes two ways: RunPod cancels the job's task (CancelledError here), or
        a front sets `cancel` when its caller goes away (GenerationCancelled from longform).
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

    async def _ready(self, request: SpeechRequest) -> tuple[Plan, float, float]:
        """The request planned, the model loaded and the prompt checked, before any
        generation: (plan, milliseconds planning, milliseconds waiting for the model)."""
        started = time.perf_counter()
        plan = await self.plan(request)
        resolve_ms = _ms_since(started)
        load_ms = await self.on_engine_thread(self.engine.load) * 1000.0
        await asyncio.to_thread(self._check_prompt, plan)
        return plan, resolve_ms, load_ms

    def _check_prompt(self, plan: Plan) -> None:
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

    async def plan(self, request: SpeechRequest) -> Plan:
        """Split the text (in a thread) and check the request's total work, then resolve
        voices (downloads on the event loop, decoding in threads): every check that needs
        no model comes before any download."""
        chunks = await asyncio.to_thread(self._chunks, request)
        resolve = self.voices.resolve_async
        voice = await resolve(request.voice, "voice") if request.voice is not None else None
        speakers = None
        if request.speakers:
            speakers = {
                tag: await resolve(v, f"speakers.{tag}") for tag, v in request.speakers.items()
            }
        return self._plan(request, chunks, voice, speakers)

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

    def _plan(
        self,
        request: SpeechRequest,
        chunks: list[Chunk],
        voice: ResolvedVoice | None,
        speakers: dict[str, ResolvedVoice] | None,
    ) -> Plan:
        """Fix what generation needs."""

        def make_conversation(text: str, history: Any) -> list[dict[str, Any]]:
            return build_conversation(
                text, scene=request.scene, voice=voice, speakers=speakers, history=history
            )

        return Plan(
            chunks=chunks,
            make_conversation=make_conversation,
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


class _FrameCounter:
    """Counts frames and chunks for progress reports, at most one report a second."""

    def __init__(self, progress: Progress | None, chunks: int) -> None:
        self.progress = progress
        self.total_chunks = chunks
        self.current_chunk = 0
        self.count = 0
        self.last_sent = 0.0

    def chunk(self, index: int) -> None:
        self.current_chunk = index
        self._report(force=True)

    def frames(self, frames: torch.Tensor) -> None:
        self.count += int(frames.shape[0])
        self._report()

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last_sent < 1.0):
            return
        self.last_sent = now
        self.progress({"chunk": self.current_chunk + 1, "chunks": self.total_chunks,
                       "frames": self.count})  # fmt: skip


async def within(timeout_s: float, items: AsyncGenerator[T, None]) -> AsyncIterator[T]:
    """`items` until `timeout_s` from now; then the one being awaited is cancelled (a
    stream's generation with it) and `RequestTimeout` is raised.

    The deadline bounds each wait for the next item, never the caller's handling of it,
    so it can wrap a generator whose consumer is another task (a response body).
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    item = await anext(items)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if scope.expired():
                    raise RequestTimeout(timeout_s) from None
                raise
            yield item
    finally:
        await items.aclose()


def _progress_reporter(job: dict[str, Any]) -> Progress | None:
    """Progress goes to RunPod's /status while a job runs; off RunPod there is nowhere to send."""
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return None
    from runpod.serverless import progress_update  # imported late: see cli._start_runpod

    return lambda message: progress_update(job, message)


def _summary(
    synthesis: LongSynthesis,
    audio_format: str,
    sample_rate: int,
    duration_s: float,
    timings_ms: dict[str, float],
    frame_rate: float,
) -> dict[str, Any]:
    busy_s = (timings_ms["generate"] + timings_ms.get("decode", 0.0)) / 1000.0
    return {
        "format": audio_format,
        "content_type": audio.CONTENT_TYPES[audio_format],
        "sample_rate": sample_rate,
        "duration_s": round(duration_s, 3),
        "seed": synthesis.seed,
        "usage": {
            "prompt_tokens": synthesis.prompt_tokens,
            "generated_tokens": synthesis.generated_tokens,
            "audio_frames": synthesis.frames,
        },
        "chunks": [
            {
                "index": c.index,
                "text_start": c.start,
                "text_end": c.end,
                "frames": c.frames,
                "duration_s": round(c.frames / frame_rate, 3),
                "generate_ms": round(c.generate_ms, 1),
            }
            for c in synthesis.chunks
        ],
        "timings_ms": {name: round(value, 1) for name, value in timings_ms.items()},
        "real_time_factor": round(busy_s / duration_s, 4) if duration_s else None,
    }


class _Pieces:
    """Numbers the streamed pieces and notes when the first audio left.

    A piece whose bytes are all held back (a codec's frame, atempo's window) is not sent;
    its frames are counted in the next piece, so the frames of the pieces add up.
    """

    def __init__(self, request: SpeechRequest, hop: int) -> None:
        self.request = request
        self.hop = hop
        self.index = 0
        self.frames = 0
        self.first_audio_ms: float | None = None

    def add(self, data: bytes, samples: int, started: float) -> dict[str, Any] | None:
        self.frames += samples // self.hop
        if not data:
            return None
        if self.first_audio_ms is None:
            self.first_audio_ms = _ms_since(started)
        piece = {"index": self.index, "audio_base64": _b64(data), "format": self.request.format,
                 "sample_rate": self.request.sample_rate, "frames": self.frames}  # fmt: skip
        self.index, self.frames = self.index + 1, 0
        return piece


def _message(error: Exception, job: dict[str, Any]) -> str:
    """The one place an exception becomes what the caller reads."""
    job_id = str(job.get("id", "local"))
    if isinstance(error, RequestError):
        log.info("job %s rejected: %s", job_id, error)
        return str(error)
    if isinstance(error, HiggsRunpodError):
        log.error("job %s failed: %s", job_id, error)
        return str(error)
    log.error("job %s failed with an internal error", job_id, exc_info=error)
    return f"internal error while generating speech (job {job_id}); the worker log has the details"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _encode(samples: Any, source_rate: int, request: SpeechRequest) -> tuple[bytes, float]:
    """Speed, sample rate and format as requested; returns the bytes and their duration.

    The same encoder as a stream's, fed at once: a stream of this request joins into
    these bytes (see progressive.py).
    """
    encoder = ProgressiveEncoder(
        request.format, source_rate, request.sample_rate, request.speed, whole=True
    )
    encoded = encoder.feed(samples) + encoder.finish()
    return encoded, encoder.samples_out / request.sample_rate


_worker: Worker | None = None


def get_worker() -> Worker:
    """The process's worker, built from the environment on first use (not at import)."""
    global _worker
    if _worker is None:
        _worker = Worker(load_settings())
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod entry point: `runpod.serverless.start({"handler": handler})`."""
    return await get_worker().handle(job)


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """RunPod streaming entry point (ENABLE_STREAMING=true)."""
    async for item in get_worker().handle_stream(job):
        yield item
