"""The RunPod handlers: a job's `input` in, speech out.

    input --schema.parse_request--> SpeechRequest --voices--> clips / descriptions
          --chunking--> chunks --longform + engine (off the event loop)--> codes
          --decode--> samples --progressive (speed, rate, format)--> Speech
          --storage (inline base64 or S3 upload)--> response (or streamed pieces)

A job whose input has `action` manages the voice library instead (voice_service.py).
A speech job with `save_voice` keeps its take as a library voice: its generated codes and
its decoded audio, stored once the audio is made.

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
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

import torch

from higgs_runpod.delivery.storage import Storage
from higgs_runpod.errors import RequestError, RequestTimeout, known_error
from higgs_runpod.library.manage import ACTIONS, Encoder, VoiceService
from higgs_runpod.library.store import list_library
from higgs_runpod.request.chunking import Chunk, split_text
from higgs_runpod.request.prompts import build_conversation, normalize_text
from higgs_runpod.request.schema import SpeechRequest, VoiceFields, parse_request
from higgs_runpod.request.voices import ReferenceClip, ResolvedVoice, VoiceResolver
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.synthesis import audio
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.synthesis.longform import LongSynthesis, MakeConversation, synthesize_chunks
from higgs_runpod.synthesis.progressive import ProgressiveEncoder
from higgs_runpod.synthesis.streaming import PieceDecoder, decode_as_streamed
from higgs_runpod.timing import ms_since

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
    extra: dict[str, Any]  # voice_codes, and saved_voice when the take was kept

    def metadata(self) -> dict[str, Any]:
        """Every response field except the audio itself (see the README's response table)."""
        return {**_summary(self.synthesis, self.format, self.sample_rate, self.duration_s,
                           self.timings_ms, self.frame_rate), **self.extra}  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """What a request asks the engine for, ready to generate."""

    chunks: list[Chunk]
    make_conversation: MakeConversation
    params: SamplingParams
    context_chunks: int
    voice: ResolvedVoice | None = None  # what make_conversation speaks with
    speakers: dict[str, ResolvedVoice] | None = None


@dataclass(frozen=True)
class _Codes:
    """Where a request's reference codes came from (its `voice_codes` response field)."""

    counts: dict[str, int]
    encode_ms: float  # getting them, encodes included

    @property
    def voice_encode_ms(self) -> float:
        """The timings' voice_encode: 0 when no clip went through the audio tokenizer."""
        return self.encode_ms if self.counts["encoded"] else 0.0


class Worker:
    """Everything a job needs, built once per process from the settings."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.voices = VoiceResolver(settings)
        self.library = VoiceService(settings, self.voices, self._encoder)
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

    def _encoder(self) -> Encoder:
        self.engine.load()
        cache = self.engine.voice_cache
        assert cache is not None
        return Encoder(self.engine.encode_clip, cache.tokenizer_id, cache.shape)

    def warm_voices(self) -> int:
        """Give every library voice its codes now, so no request encodes one; returns how
        many had to be encoded. A voice that cannot be read is logged and skipped."""
        counts = _new_counts()
        for entry in list_library(self.settings.voices_path):
            try:
                clip = self.voices.library_clip(entry, "voice")
            except RequestError as error:
                log.warning("library voice %s skipped: %s", entry.name, error.message)
                continue
            self._with_codes(clip, counts)
        return counts["encoded"]

    def _with_codes(self, clip: ReferenceClip, counts: dict[str, int]) -> ReferenceClip:
        """The clip with its codes: a library voice's own, else from the voice cache (which
        encodes on a miss). A library voice without codes gets them written into it."""
        encoder = self._encoder()
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

    def _with_all_codes(self, plan: Plan, request: SpeechRequest) -> tuple[Plan, _Codes]:
        """Every reference clip of the plan with its codes, and how they were had; a kept
        take's length bounded by MAX_REF_AUDIO_SECONDS (the model is loaded by now)."""
        counts = _new_counts()
        started = time.perf_counter()

        def attach(voice: ResolvedVoice | None) -> Any:
            return self._with_codes(voice, counts) if isinstance(voice, ReferenceClip) else voice

        speakers = {tag: attach(v) for tag, v in plan.speakers.items()} if plan.speakers else None
        coded = self._plan(request, plan.chunks, attach(plan.voice), speakers)
        codes = _Codes(counts, ms_since(started))
        if request.save_voice is None:
            return coded, codes
        limit = self.settings.max_ref_audio_seconds
        frames = int(limit * self.engine.frame_rate)
        if "max_new_tokens" in request.model_fields_set and request.max_new_tokens > frames:
            raise RequestError(
                "max_new_tokens",
                f"must be at most {frames} with save_voice: a kept take is at most "
                f"{limit:g} s (MAX_REF_AUDIO_SECONDS)",
            )
        params = replace(coded.params, max_new_tokens=min(coded.params.max_new_tokens, frames))
        return replace(coded, params=params), codes

    async def action(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A voice-library job (`voice.create`, `voice.list`, `voice.get`, `voice.delete`)."""
        fields = dict(raw)
        action = fields.pop("action")
        if action not in ACTIONS:
            raise RequestError("action", f"must be one of {', '.join(ACTIONS)}")
        if action == "voice.list":
            _no_fields(fields, set())
            return await asyncio.to_thread(self.library.list)
        if action == "voice.create":
            return (await self.library.create(fields)).public()
        _no_fields(fields, {"name", "audio"} if action == "voice.get" else {"name"})
        name = fields.get("name")
        if not isinstance(name, str):
            raise RequestError("name", "is required")
        if action == "voice.delete":
            await asyncio.to_thread(self.library.delete, name, self._forget)
            return {"deleted": name}
        voice = self.library.get(name)
        result = voice.public()
        if fields.get("audio") is True:
            clip = await asyncio.to_thread(voice.audio_path.read_bytes)
            result["audio_base64"] = _b64(clip)
        return result

    def _forget(self, samples: Any) -> None:
        if self.engine.voice_cache is not None:
            self.engine.voice_cache.forget(samples)

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job to a single response; never raises (RunPod would send a traceback)."""
        try:
            if _is_action(job.get("input")):
                return await self._in_time(self.action(job["input"]))
            request = parse_request(job.get("input"), self.settings)
            if request.stream:
                raise RequestError(
                    "stream", "this endpoint streams only when started with ENABLE_STREAMING=true"
                )
            return await self._in_time(self._respond(job, request))
        except Exception as error:
            return job_error(error, job)

    async def handle_stream(self, job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Run one job as a stream of outputs; errors end it with `{"error": ...}`."""
        try:
            if _is_action(job.get("input")):
                yield await self._in_time(self.action(job["input"]))
                return
            request = parse_request(job.get("input"), self.settings)
            if request.stream:
                pieces = self.stream(request, progress=_progress_reporter(job, self.settings))
                async for item in within(self.settings.request_timeout_s, pieces):
                    yield item
            else:
                yield await self._in_time(self._respond(job, request))
        except Exception as error:
            yield job_error(error, job)

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
        speech = await self.speak(request, progress=_progress_reporter(job, self.settings))
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
        plan, resolve_ms, load_ms, codes = await self._ready(request)
        counter = _FrameCounter(progress, len(plan.chunks))
        synthesis = await self.generate(plan, counter.frames, counter.chunk, cancel)
        decode_start = time.perf_counter()
        samples = await self.on_engine_thread(self._decode, synthesis.codes)
        decode_ms = ms_since(decode_start)
        extra: dict[str, Any] = {"voice_codes": codes.counts}
        if request.save_voice is not None:
            extra["saved_voice"] = await asyncio.to_thread(
                self._keep_take, request, synthesis, samples
            )
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
            extra=extra,
            timings_ms={
                "load": load_ms,
                "prepare": resolve_ms + codes.encode_ms + synthesis.prepare_ms,
                "voice_encode": codes.voice_encode_ms,
                "generate": synthesis.generate_ms,
                "decode": decode_ms,
                "encode": ms_since(encode_start),
                "total": ms_since(started),
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
        plan, resolve_ms, load_ms, codes = await self._ready(request)
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
        extra: dict[str, Any] = {"voice_codes": codes.counts}
        if request.save_voice is not None:
            samples = await self.on_engine_thread(self._decode, synthesis.codes)
            extra["saved_voice"] = await asyncio.to_thread(
                self._keep_take, request, synthesis, samples
            )
        timings = {"load": load_ms, "prepare": resolve_ms + codes.encode_ms + synthesis.prepare_ms,
                   "voice_encode": codes.voice_encode_ms,
                   "generate": synthesis.generate_ms, "first_audio": pieces.first_audio_ms or 0.0,
                   "total": ms_since(started)}  # fmt: skip
        duration_s = encoder.samples_out / request.sample_rate
        yield {"done": True, "pieces": pieces.index,
               **_summary(synthesis, request.format, request.sample_rate, duration_s, timings,
                          self.engine.frame_rate), **extra}  # fmt: skip

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

    async def _ready(self, request: SpeechRequest) -> tuple[Plan, float, float, _Codes]:
        """The request planned, the model loaded, the clips' codes had and the prompt
        checked, before any generation: (plan, milliseconds planning, milliseconds waiting
        for the model, where the codes came from)."""
        started = time.perf_counter()
        plan = await self.plan(request)
        resolve_ms = ms_since(started)
        load_ms = await self.on_engine_thread(self.engine.load) * 1000.0
        plan, codes = await asyncio.to_thread(self._with_all_codes, plan, request)
        await asyncio.to_thread(self._check_prompt, plan)
        return plan, resolve_ms, load_ms, codes

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
        if request.save_voice is not None:
            await asyncio.to_thread(self._check_keepable, request, chunks)
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

    def _check_keepable(self, request: SpeechRequest, chunks: list[Chunk]) -> None:
        """Refuse, before any download or generation, a take that could not be kept."""
        save = request.save_voice
        assert save is not None
        if request.speakers is not None or len(request.speaker_tags) > 1:
            raise RequestError("save_voice", "only a single-voice take can be kept (no speakers)")
        if len(chunks) != 1:
            raise RequestError(
                "save_voice",
                f"the text makes {len(chunks)} chunks; only a single-chunk take can be kept",
            )
        self.library.check_new(save.name, save.consent, save.overwrite, "save_voice.name")

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


def _new_counts() -> dict[str, int]:
    return {"library": 0, "memory": 0, "disk": 0, "encoded": 0}


def _is_action(raw: Any) -> bool:
    return isinstance(raw, dict) and "action" in raw


def _no_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise RequestError(unknown[0], "unknown field")


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


def _progress_reporter(job: dict[str, Any], settings: Settings) -> Progress | None:
    """Progress goes to RunPod's /status while a job runs; off RunPod there is nowhere to send."""
    if not settings.runpod_webhook_post_output:
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
            self.first_audio_ms = ms_since(started)
        piece = {"index": self.index, "audio_base64": _b64(data), "format": self.request.format,
                 "sample_rate": self.request.sample_rate, "frames": self.frames}  # fmt: skip
        self.index, self.frames = self.index + 1, 0
        return piece


def job_error(error: BaseException, job: dict[str, Any]) -> dict[str, str]:
    """RunPod's failed-job shape for `error`: the one place an exception becomes what a
    queue caller reads. Ours are shown as they are (errors.py); a bug is logged whole."""
    job_id = str(job.get("id", "local"))
    known = known_error(error)
    if known is None:
        log.error("job %s failed with an internal error", job_id, exc_info=error)
        return {
            "error": f"internal error while generating speech (job {job_id}); "
            "the worker log has the details"
        }
    if isinstance(known, RequestError):
        log.info("job %s rejected: %s", job_id, known)
    else:
        log.error("job %s failed: %s", job_id, known)
    return {"error": str(known)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


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
