"""OpenAI-compatible speech API over HTTP (RunPod load-balancing endpoints, or any host).

The HTTP layer only translates; the audio comes from the same speech service as a queue
job's (service/), as raw bytes:

    POST /v1/audio/speech --openai_schema--> SpeechRequest --SpeechService.stream--> pieces
         --AudioStream--> chunked audio bytes, or SSE speech.audio.delta / speech.audio.done
    GET /v1/audio/speech/stream (WebSocket): text in as it is written, audio out (speech_ws)

Keys, content types and bodies are checked first (`http_guard`, which also bounds sockets).
Errors leave in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` from
`http_errors.error_response`, and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Any

import torch
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from higgs_runpod.errors import (
    ClientGone,
    HiggsRunpodError,
    RequestError,
    RequestTimeout,
)
from higgs_runpod.fronts import http_errors
from higgs_runpod.fronts.http_errors import error_response
from higgs_runpod.fronts.http_guard import (
    CloseUnread,
    authorize,
    read_json,
    require_json,
)
from higgs_runpod.fronts.http_metrics import CONTENT_TYPE, CountRequests, Metrics
from higgs_runpod.fronts.http_state import Service
from higgs_runpod.fronts.http_voices import VOICES_ROUTE, voice_router
from higgs_runpod.fronts.speech_ws import STREAM_ROUTE, speech_stream
from higgs_runpod.library.takes import new_take_id
from higgs_runpod.request.openai_schema import (
    MODEL_ALIASES,
    MODEL_ID,
    in_openai_terms,
    parse_openai_speech,
)
from higgs_runpod.request.schema import SpeechRequest
from higgs_runpod.service.deadline import within
from higgs_runpod.service.results import Piece
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio

log = logging.getLogger(__name__)

SPEECH_ROUTE = "/v1/audio/speech"
ROUTES = frozenset({"/", "/ping", "/metrics", "/v1/models", VOICES_ROUTE, SPEECH_ROUTE})


class AudioStream:
    """One request's encoded audio, handed out in pieces as the engine delivers it.

    Every format and speed streams from the engine (`SpeechService.stream`, progressive.py):
    pieces leave as frames complete, so the first byte comes after STREAM_FIRST_FRAMES
    frames, and the joined pieces are the file a queue job returns for the same request.

    The seed, and a remembered take's id, are fixed up front so that they can go out in
    headers before any audio (the take is written once its last frame is made).
    `on_close` runs once the stream ends, fails or is dropped (a started async generator
    is closed when it is garbage collected), so an admission is always given back.
    """

    def __init__(
        self, speech: SpeechService, request: SpeechRequest, on_close: Callable[[], None]
    ) -> None:
        self.speech = speech
        self.seed = request.seed if request.seed is not None else random.randrange(2**32)
        self.request = request.model_copy(update={"seed": self.seed, "stream": True})
        self.take_id = new_take_id() if request.remember_take else None
        self.on_close = on_close
        self.cancel = threading.Event()
        self.summary: dict[str, Any] = {}  # the stream's metadata, once the audio is complete
        self.first_audio_s: float | None = None
        self._started = time.perf_counter()
        self._pieces = self._generate()

    @property
    def usage(self) -> dict[str, int] | None:
        """Tokens and frames, once the audio is complete."""
        return self.summary.get("usage")

    @property
    def duration_s(self) -> float:
        return float(self.summary.get("duration_s", 0.0))

    async def first(self) -> bytes:
        """The first piece (b"" for empty audio); errors surface here, before any byte."""
        piece = await anext(self._pieces, b"")
        self.first_audio_s = time.perf_counter() - self._started
        return piece

    async def rest(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._pieces:
                yield piece
        finally:
            self.cancel.set()  # a client that leaves mid-stream stops the engine too
            await self._pieces.aclose()

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        timeout_s = self.speech.settings.request_timeout_s
        try:
            pieces = self.speech.stream(self.request, cancel=self.cancel, take_id=self.take_id)
            async for item in within(timeout_s, pieces):
                if isinstance(item, Piece):
                    yield item.audio
                else:
                    self.summary = item.metadata
        finally:
            self.on_close()


def create_app(settings: Settings, speech: SpeechService | None = None) -> CountRequests:
    """The ASGI app (FastAPI inside the request counter; its `.app.state.service` holds the
    speech service); `speech` defaults to one built from `settings` (the model loads at
    start)."""
    service = Service(settings, speech or SpeechService(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_loading()
        yield

    app = FastAPI(
        title="Higgs Audio v2 speech API",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service
    app.include_router(_open_router(service))
    app.include_router(_api_router(service))
    app.add_api_websocket_route(STREAM_ROUTE, speech_stream)  # checks its key itself
    app.include_router(voice_router(service, [Depends(authorize)]))
    # Every error leaves through http_errors. Exception (a bug of ours) is Starlette's
    # last resort, which also re-raises it for the server's log.
    for kind in (HiggsRunpodError, StarletteHTTPException, torch.OutOfMemoryError, Exception):
        app.add_exception_handler(kind, http_errors.handle)
    app.add_middleware(CloseUnread)
    return CountRequests(app, service.metrics, ROUTES)


def _open_router(service: Service) -> APIRouter:
    """The routes without a key: the playground page and RunPod's health check."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        page = resources.files(__package__).joinpath("static/playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @router.get("/ping")
    async def ping() -> Response:
        """RunPod's health contract: 200 ready, 204 still loading, 500 unusable."""
        if service.load_failed:
            return Response(status_code=500)
        service.metrics.model_loaded.set(1 if service.speech.engine.is_loaded else 0)
        return Response(status_code=200 if service.ready else 204)

    return router


def _api_router(service: Service) -> APIRouter:
    """The routes behind the key: metrics, models, and speech."""
    router = APIRouter(dependencies=[Depends(authorize)])

    @router.get("/metrics")
    async def metrics() -> Response:
        engine = service.speech.engine
        service.metrics.model_loaded.set(1 if engine.is_loaded else 0)
        service.metrics.prompt_cache_tokens.set(engine.prompt_cache.tokens)
        service.metrics.prompt_cache_reused_tokens.set(engine.prompt_cache.reused_tokens)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        ids = (MODEL_ID, *MODEL_ALIASES)
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "bosonai"} for i in ids]
        return {"object": "list", "data": data}

    @router.post(SPEECH_ROUTE, dependencies=[Depends(require_json)])
    async def speech(request: Request) -> Response:
        return await _speech(service, request)

    return router


async def _speech(service: Service, request: Request) -> Response:
    """POST /v1/audio/speech: admit, read and parse the body, then stream the audio (chunked
    or SSE) once its first piece is made; errors before it are answered here."""
    settings = service.settings
    service.admit()  # before the body: a slow sender holds a place, and only for so long
    try:
        limit, timeout_s = settings.http_max_body_bytes, settings.http_body_timeout_s
        parsed = parse_openai_speech(await read_json(request, limit, timeout_s), settings)
    except BaseException:
        service.release()
        raise
    stream = AudioStream(service.speech, parsed.request, service.release)
    started = time.perf_counter()
    try:
        first = await _first_piece(stream, request, service.metrics)
    except RequestError as error:  # found while planning: voices, chunks, prompt
        return error_response(in_openai_terms(error), SPEECH_ROUTE)
    except Exception as error:  # answered here: a bug's traceback is logged once
        return error_response(error, SPEECH_ROUTE)
    assert stream.first_audio_s is not None
    service.metrics.first_audio_seconds.labels("http").observe(stream.first_audio_s)
    headers = {
        "X-Seed": str(stream.seed),
        "X-Time-To-First-Audio-Ms": f"{stream.first_audio_s * 1000:.1f}",
    }
    if stream.take_id is not None:
        headers["X-Take-Id"] = stream.take_id
    pieces = _chained(first, stream, service.metrics, started)
    if parsed.request.save_voice is not None:
        # The voice is kept after the last frame: wait for it, so that the answer can
        # say it was kept (X-Saved-Voice) or fail with why it was not.
        whole = b"".join([piece async for piece in pieces])
        headers["X-Saved-Voice"] = stream.summary["saved_voice"]["name"]
        pieces = _once(whole)
    if parsed.stream_format == "sse":
        events = _sse_events(pieces, stream)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    media_type = audio.CONTENT_TYPES[parsed.request.format]
    return StreamingResponse(pieces, media_type=media_type, headers=headers)


async def _first_piece(stream: AudioStream, request: Request, metrics: Metrics) -> bytes:
    """Wait for the first audio piece, stopping generation if the client leaves meanwhile.

    Errors before the first piece (bad voice, engine failure) still become proper error
    responses, because nothing has been sent yet.
    """
    first = asyncio.ensure_future(stream.first())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():
            stream.cancel.set()
            metrics.cancelled.inc()
            log.info("client disconnected; generation stopped")
            with suppress(HiggsRunpodError):  # GenerationCancelled, or whatever came first
                await first
            raise ClientGone
        return first.result()
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _chained(
    first: bytes, stream: AudioStream, metrics: Metrics, started: float
) -> AsyncIterator[bytes]:
    """All the audio; the metrics count it once the last piece has gone, or count a
    cancellation when the client left mid-stream (the stream's `rest` stops the engine)."""
    client_left = True  # unless the stream ends or runs out of time
    try:
        if first:
            yield first
        async for piece in stream.rest():
            yield piece
        client_left = False
    except RequestTimeout as error:  # headers are gone: the connection is aborted instead
        client_left = False
        log.warning("speech request stopped mid-stream: %s", error)
        raise
    finally:
        if client_left:
            metrics.cancelled.inc()
            log.info("client disconnected mid-stream; generation stopped")
    metrics.generation_seconds.observe(time.perf_counter() - started)
    metrics.audio_seconds.inc(stream.duration_s)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _sse_events(pieces: AsyncIterator[bytes], stream: AudioStream) -> AsyncIterator[bytes]:
    """OpenAI's speech SSE: `speech.audio.delta` events (base64 audio), then `done`."""
    async for piece in pieces:
        yield _event({"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()})
    assert stream.usage is not None
    prompt, generated = stream.usage["prompt_tokens"], stream.usage["generated_tokens"]
    usage = {"input_tokens": prompt, "output_tokens": generated, "total_tokens": prompt + generated}
    # Beyond OpenAI's fields: how the reference codes were had, the kept voice, the take.
    extra: dict[str, Any] = {
        key: stream.summary[key]
        for key in ("voice_codes", "saved_voice", "take_id")
        if key in stream.summary
    }
    yield _event({"type": "speech.audio.done", "usage": usage, **extra})


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()
