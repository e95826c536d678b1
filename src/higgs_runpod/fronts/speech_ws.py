"""Text in as it is written, audio out as it is made: `GET /v1/audio/speech/stream`.

    client: config {"model", "voice", "response_format", ...}, then {"text"} ... {"close"}
      --_receive: Segmenter (sentence ends, or chunking.max_words words)--> segments
      --_generate: SpeechService.generate, one segment at a time, the codes of the
          chunking.context_chunks segments before it as context (as longform does)--> frames
      --_send: PieceDecoder --ProgressiveEncoder (one per session)--> binary messages,
          {"type": "segment"} as each segment's audio has gone, {"type": "done"} at the end

The three run as tasks: segment k+1 generates while segment k's last pieces are decoded
and sent, and reading never waits on either. The first failure ends the session: it
cancels generation at the next step (the engine's cancel event), sends
`{"type": "error", "message"}` and closes the socket (`close_reason`: 1008 for the caller's
fault, 1011 for ours, 1013 when busy or out of memory). A client that disconnects
(`ClientGone`) cancels the same way.

Every input is bounded: the config is a speech request (schema.py's limits) read within
WS_IDLE_TIMEOUT_S, messages are at most HTTP_MAX_BODY_BYTES (refused, with the same error
message, by http_guard.GuardedWebSocketProtocol before they are read) and
WS_MAX_MESSAGE_CHARS of text, text waiting to be spoken at most WS_MAX_BUFFERED_CHARS,
a session's text at most MAX_LONG_TEXT_CHARS and its audio WS_MAX_SESSION_FRAMES frames.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from starlette.websockets import WebSocket, WebSocketDisconnect

from higgs_runpod.errors import ClientGone, SessionError, known_error
from higgs_runpod.fronts.http_errors import INTERNAL as INTERNAL_MESSAGE
from higgs_runpod.fronts.http_guard import key_refusal
from higgs_runpod.fronts.http_state import Service
from higgs_runpod.request.chunking import Chunk, segment_end
from higgs_runpod.request.openai_schema import parse_openai_speech
from higgs_runpod.service.planning import GenerationPlan
from higgs_runpod.service.speech import Prepared
from higgs_runpod.synthesis.progressive import ProgressiveEncoder
from higgs_runpod.synthesis.streaming import PieceDecoder

log = logging.getLogger(__name__)

STREAM_ROUTE = "/v1/audio/speech/stream"
POLICY, INTERNAL, BUSY = 1008, 1011, 1013  # WebSocket close codes
_NOT_IN_CONFIG = ("input", "stream", "stream_format", "output", "save_voice", "remember_take")
_PLACEHOLDER = "."  # stands for the text while the config alone is checked


def close_reason(error: BaseException) -> tuple[str, int]:
    """The error message a session ends with, and its close code: 1008 for the caller's
    fault, 1013 for try again later (busy, out of memory), 1011 for ours (logged whole)."""
    known = known_error(error)
    if known is None:
        log.error("WebSocket speech session failed", exc_info=error)
        return INTERNAL_MESSAGE, INTERNAL
    if known.http_status in (429, 503):
        code = BUSY
    else:
        code = POLICY if known.http_status < 500 else INTERNAL
    if code == INTERNAL:
        log.error("WebSocket speech session failed: %s", known)
    return (str(known) if known.public else INTERNAL_MESSAGE), code


@dataclass(frozen=True)
class _SegmentDone:
    index: int
    text: str
    frames: int


class Segmenter:
    """Text arriving in pieces, cut into segments at sentence ends or after `max_words`."""

    def __init__(self, max_words: int) -> None:
        self.max_words = max_words
        self.buffer = ""

    def push(self, text: str) -> list[str]:
        """Add text; return the segments it completes."""
        self.buffer += text
        segments = []
        while (cut := segment_end(self.buffer, self.max_words)) is not None:
            segments.append(self.buffer[: cut[0]].strip())
            self.buffer = self.buffer[cut[1] :]
        return [segment for segment in segments if segment]

    def flush(self) -> list[str]:
        """Whatever is buffered, as one segment (none if it is only whitespace)."""
        text, self.buffer = self.buffer.strip(), ""
        return [text] if text else []


class Session:
    """One WebSocket client from config to close."""

    def __init__(self, service: Service, websocket: WebSocket) -> None:
        self.service = service
        self.settings = service.settings
        self.speech = service.speech
        self.websocket = websocket
        self.cancel = threading.Event()
        self.segments: asyncio.Queue[str | None] = asyncio.Queue()
        self.out: asyncio.Queue[torch.Tensor | _SegmentDone | SessionError | None] = asyncio.Queue()
        self.pending_chars = 0  # text received and not yet generated
        self.total_chars = 0
        self.unsent = 0  # segments queued, generating or sending
        self.config: dict[str, Any] = {}
        self.prepared: Prepared | None = None
        self.tags = ""  # the speakers' tags, for checking the config and each segment
        self.usage = {"input_tokens": 0, "output_tokens": 0, "audio_frames": 0}
        self.first_queued: float | None = None
        self.first_audio_s: float | None = None
        self.audio_seconds = 0.0
        self.seed = 0

    async def run(self) -> None:
        """Authorize, admit, read the config, then stream until done or failure."""
        offered = self.websocket.scope.get("subprotocols") or []
        refusal = key_refusal(self.websocket, self.settings, offered[0] if offered else None)
        # A browser fails the socket unless one offered subprotocol is chosen.
        await self.websocket.accept(subprotocol=offered[0] if offered else None)
        try:
            if refusal is not None:
                raise SessionError(refusal)
            self.service.admit()
            try:
                await self._stream(await self._configure())
            finally:
                self.service.release()
        except ClientGone:
            if self.unsent:
                self.service.metrics.cancelled.inc()
                log.info("WebSocket client disconnected; generation stopped")
        except Exception as error:
            await self._fail(*close_reason(error))

    async def _configure(self) -> GenerationPlan:
        """The first message: a speech request without its text, checked and prepared as one
        (its voices' codes had once, a library voice's its own, as for HTTP and the queue)."""
        message = await self._receive_json(timeout_s=self.settings.ws_idle_timeout_s)
        if not isinstance(message, dict):
            raise SessionError("the first message must be a JSON object: the config")
        for name in _NOT_IN_CONFIG:
            if name in message:
                raise SessionError(f"config.{name}: not allowed here (send text in messages)")
        self.config = {"response_format": "mp3", **message}
        speakers = message.get("speakers")
        # `speakers` must be the tags a text uses, and a segment is a part of the text: each
        # is checked with every speaker's tag added.
        if isinstance(speakers, dict):
            self.tags = " " + " ".join(f"[{name}]" for name in speakers)
        body = {**self.config, "input": _PLACEHOLDER + self.tags}
        request = parse_openai_speech(body, self.settings).request
        self.seed = request.seed if request.seed is not None else random.randrange(2**32)
        self.config["seed"] = self.seed  # every segment the same seed, as a long text's chunks
        self.request = request.model_copy(update={"seed": self.seed})
        self.prepared = await self.speech.prepare(self.request)
        return self.prepared.plan

    async def _stream(self, plan: GenerationPlan) -> None:
        tasks = [
            asyncio.ensure_future(self._receive()),
            asyncio.ensure_future(self._generate(plan)),
            asyncio.ensure_future(self._send()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the first failure, if any
            await tasks[2]  # without failure the sender ends the session
        finally:
            self.cancel.set()  # stops the engine at its next step if still generating
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self) -> None:
        """Client messages to segments, until the socket closes (after a close message too)."""
        segmenter = Segmenter(self.request.chunking.max_words)
        closed = False
        while True:
            message = await self._receive_json(timeout_s=None)
            if closed:
                raise SessionError('no messages are taken after {"close": true}')
            if not isinstance(message, dict):
                raise SessionError('messages must be JSON objects: {"text"}, {"flush"}, {"close"}')
            segments = []
            if "text" in message:
                segments += segmenter.push(self._take_text(message["text"]))
            if message.get("flush") is True or message.get("close") is True:
                segments += segmenter.flush()
            unknown = set(message) - {"text", "flush", "close"}
            if unknown or not message:
                what = (
                    f"unknown message field {sorted(unknown)[0]!r}" if unknown else "empty message"
                )
                raise SessionError(
                    what + '; send {"text": "..."}, {"flush": true} or {"close": true}'
                )
            for segment in segments:
                self._queue(segment)
            if message.get("close") is True:
                closed = True
                self.segments.put_nowait(None)

    def _take_text(self, text: Any) -> str:
        settings = self.settings
        if not isinstance(text, str):
            raise SessionError("text: must be a string")
        if len(text) > settings.ws_max_message_chars:
            raise SessionError(
                f"text: one message holds {len(text)} characters; the limit is "
                f"{settings.ws_max_message_chars} (WS_MAX_MESSAGE_CHARS)"
            )
        self.total_chars += len(text)
        if self.total_chars > settings.max_long_text_chars:
            raise SessionError(
                f"text: the session has sent {self.total_chars} characters; the limit is "
                f"{settings.max_long_text_chars} (MAX_LONG_TEXT_CHARS)"
            )
        self.pending_chars += len(text)
        if self.pending_chars > settings.ws_max_buffered_chars:
            raise SessionError(
                f"text: {self.pending_chars} characters are waiting to be spoken; the limit "
                f"is {settings.ws_max_buffered_chars} (WS_MAX_BUFFERED_CHARS): send more "
                "once audio has come back"
            )
        return text

    def _queue(self, segment: str) -> None:
        parse_openai_speech({**self.config, "input": segment + self.tags}, self.settings)
        if self.first_queued is None:
            self.first_queued = time.perf_counter()
        self.unsent += 1
        self.segments.put_nowait(segment)

    async def _receive_json(self, timeout_s: float | None) -> Any:
        """The next text message as JSON; an idle session times out, a busy one waits."""
        idle = self.settings.ws_idle_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), timeout_s or idle)
                break
            except TimeoutError:
                if timeout_s is None and self.unsent:
                    continue  # the client waits for audio; that is not idle
                raise SessionError(f"no message for {idle:g} s (WS_IDLE_TIMEOUT_S)") from None
        if message["type"] == "websocket.disconnect":
            raise ClientGone
        if message.get("text") is None:
            raise SessionError("messages must be text (JSON), not binary")
        try:
            return json.loads(message["text"])
        except (json.JSONDecodeError, RecursionError):
            raise SessionError("a message is not JSON we accept") from None

    async def _generate(self, plan: GenerationPlan) -> None:
        """Segment after segment, each hearing the ones before it; frames go to `_send`."""
        loop = asyncio.get_running_loop()
        history: list[tuple[str, torch.Tensor]] = []
        context = plan.context_chunks
        index = 0

        def on_frames(frames: torch.Tensor) -> None:
            loop.call_soon_threadsafe(self.out.put_nowait, frames)

        limit = self.settings.ws_max_session_frames
        while (text := await self.segments.get()) is not None:
            # Each step makes at most one frame, so a step budget bounds the frames too.
            budget = min(plan.params.max_new_tokens, limit - self.usage["audio_frames"])
            params = replace(plan.params, max_new_tokens=budget)
            segment_plan = replace(plan, chunks=[Chunk(0, len(text), text)], params=params)
            synthesis = await self.speech.generate(
                segment_plan, on_frames, None, self.cancel, history=history
            )
            if context:
                history = [*history, (text, synthesis.codes)][-context:]
            self.pending_chars -= len(text)
            self.usage["input_tokens"] += synthesis.prompt_tokens
            self.usage["output_tokens"] += synthesis.generated_tokens
            self.usage["audio_frames"] += synthesis.frames
            self.out.put_nowait(_SegmentDone(index, text, synthesis.frames))
            index += 1
            if budget < plan.params.max_new_tokens and synthesis.generated_tokens >= budget:
                # Its audio goes out first: the error comes in order, through the sender.
                self.out.put_nowait(SessionError(
                    f"the session's audio reached its limit of {limit} frames "
                    "(WS_MAX_SESSION_FRAMES)"
                ))  # fmt: skip
                return
        self.out.put_nowait(None)

    async def _send(self) -> None:
        """Frames to audio messages; a segment's tail goes out when its generation ends."""
        engine, settings, request = self.speech.engine, self.settings, self.request
        hop = int(engine.sample_rate / engine.frame_rate)
        decoder = PieceDecoder(engine.decode_codes, engine.decoder_context_frames, hop)
        encoder = ProgressiveEncoder(
            request.format, engine.sample_rate, request.sample_rate, request.speed
        )
        first, later = settings.stream_first_frames, settings.stream_piece_frames
        while (item := await self.out.get()) is not None:
            if isinstance(item, SessionError):
                raise item
            if isinstance(item, torch.Tensor):
                decoder.push(item)
                while decoder.ready() >= (size := decoder.next_size(first, later)):
                    await self._send_audio(encoder, await asyncio.to_thread(decoder.take, size))
                continue
            while decoder.pending:  # the segment is complete: no more right context comes
                size = decoder.next_size(first, later)
                await self._send_audio(encoder, await asyncio.to_thread(decoder.take, size, True))
            await self._send_json({"type": "segment", "index": item.index, "text": item.text,
                                   "frames": item.frames})  # fmt: skip
            self.unsent -= 1
        await self._send_bytes(await asyncio.to_thread(encoder.finish))
        self.audio_seconds = encoder.samples_out / request.sample_rate
        self.service.metrics.audio_seconds.inc(self.audio_seconds)
        await self._send_json(self._done())
        await self.websocket.close()

    async def _send_audio(self, encoder: ProgressiveEncoder, samples: Any) -> None:
        await self._send_bytes(await asyncio.to_thread(encoder.feed, samples))

    async def _send_bytes(self, data: bytes) -> None:
        if not data:
            return
        if self.first_audio_s is None and self.first_queued is not None:
            self.first_audio_s = time.perf_counter() - self.first_queued
            self.service.metrics.first_audio_seconds.labels("websocket").observe(self.first_audio_s)
        await self._guarded(self.websocket.send_bytes(data))

    async def _send_json(self, payload: dict[str, Any]) -> None:
        await self._guarded(self.websocket.send_text(json.dumps(payload)))

    async def _guarded(self, sending: Any) -> None:
        try:
            await sending
        except (WebSocketDisconnect, RuntimeError, OSError):
            raise ClientGone from None

    def _done(self) -> dict[str, Any]:
        assert self.prepared is not None  # a session that ends well was configured
        usage = self.usage
        total = usage["input_tokens"] + usage["output_tokens"]
        first_ms = round(self.first_audio_s * 1000, 1) if self.first_audio_s is not None else None
        return {
            "type": "done",
            "usage": {**usage, "total_tokens": total, "input_characters": self.total_chars},
            "duration_s": round(self.audio_seconds, 3),
            "seed": self.seed,
            "first_audio_ms": first_ms,
            "voice_codes": self.prepared.codes.counts,
        }

    async def _fail(self, message: str, code: int) -> None:
        """Tell the client why, then close; a client already gone hears nothing."""
        try:
            await self.websocket.send_text(json.dumps({"type": "error", "message": message}))
            await self.websocket.close(
                code=code, reason=message.encode()[:120].decode(errors="ignore")
            )
        except (WebSocketDisconnect, RuntimeError, OSError):
            log.info("WebSocket client left before its error: %s", message)


async def speech_stream(websocket: WebSocket) -> None:
    """The route: one session per socket."""
    await Session(websocket.app.state.service, websocket).run()
