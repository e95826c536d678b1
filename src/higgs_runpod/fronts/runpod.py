"""RunPod's queue front: a job's `input` in, one JSON object (or a stream of them) out.

    job --schema.parse_request--> SpeechRequest --SpeechService.speak (service/)--> Speech
        --storage (inline base64 or S3 upload)--> response
    stream: true --SpeechService.stream--> Piece ... StreamEnd --base64--> outputs

A job whose input has `action` manages the voice library instead (library/manage.py).
`handler` returns one JSON object per job. `stream_handler` (ENABLE_STREAMING) is an
async generator, which is what RunPod needs to stream: `stream: true` jobs yield audio
pieces and a final summary; other jobs yield their single response object.

Every failure becomes RunPod's failed-job shape `{"error": "..."}` in `job_error`, and
nowhere else. The worker keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from higgs_runpod.delivery.storage import Storage
from higgs_runpod.errors import RequestError, known_error
from higgs_runpod.library.manage import ACTIONS
from higgs_runpod.request.schema import SpeechRequest, parse_request
from higgs_runpod.service.deadline import in_time, within
from higgs_runpod.service.results import Piece, Progress
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    """The queue front of one process: the speech service, and where audio is delivered."""

    def __init__(self, service: SpeechService) -> None:
        self.service = service
        self.settings = service.settings
        self.storage = Storage(service.settings)

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
                pieces = self.service.stream(request, progress=self._progress(job))
                async for item in within(self.settings.request_timeout_s, pieces):
                    if isinstance(item, Piece):
                        yield {"index": item.index, "audio_base64": _b64(item.audio),
                               "format": item.format, "sample_rate": item.sample_rate,
                               "frames": item.frames}  # fmt: skip
                    else:
                        yield {"done": True, "pieces": item.pieces, **item.metadata}
            else:
                yield await self._in_time(self._respond(job, request))
        except Exception as error:
            yield job_error(error, job)

    async def _in_time(self, work: Awaitable[T]) -> T:
        """`work` within REQUEST_TIMEOUT_S (deadline.py: generation stops with it)."""
        return await in_time(self.settings.request_timeout_s, work)

    async def _respond(self, job: dict[str, Any], request: SpeechRequest) -> dict[str, Any]:
        """One job's complete response: the audio delivered inline or to S3, and metadata."""
        # RunPod passes s3Config at the top level of the job, beside input.
        # A caller's endpointUrl is looked up and judged (outbound.py): a thread, not the loop.
        delivery = await asyncio.to_thread(self.storage.plan, request.output, job.get("s3Config"))
        speech = await self.service.speak(request, progress=self._progress(job))
        delivered = await self.storage.deliver(delivery, speech.audio, speech.format, job.get("id"))
        return {**delivered, **speech.metadata()}

    async def action(self, raw: dict[str, Any]) -> dict[str, Any]:
        """A voice-library job (`voice.create`, `voice.list`, `voice.get`, `voice.delete`)."""
        fields = dict(raw)
        action = fields.pop("action")
        if action not in ACTIONS:
            raise RequestError("action", f"must be one of {', '.join(ACTIONS)}")
        library = self.service.library
        if action == "voice.list":
            _no_fields(fields, set())
            return await asyncio.to_thread(library.list)
        if action == "voice.create":
            return (await library.create(fields)).public()
        _no_fields(fields, {"name", "audio"} if action == "voice.get" else {"name"})
        name = fields.get("name")
        if not isinstance(name, str):
            raise RequestError("name", "is required")
        if action == "voice.delete":
            await asyncio.to_thread(library.delete, name, self.service.forget)
            return {"deleted": name}
        voice = library.get(name)
        result = voice.public()
        if fields.get("audio") is True:
            clip = await asyncio.to_thread(voice.audio_path.read_bytes)
            result["audio_base64"] = _b64(clip)
        return result

    def _progress(self, job: dict[str, Any]) -> Progress | None:
        """Progress goes to RunPod's /status while a job runs; off RunPod there is nowhere
        to send it."""
        if not self.settings.runpod_webhook_post_output:
            return None
        from runpod.serverless import progress_update  # imported late: see cli._start_runpod

        return lambda message: progress_update(job, message)


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


def _is_action(raw: Any) -> bool:
    return isinstance(raw, dict) and "action" in raw


def _no_fields(fields: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise RequestError(unknown[0], "unknown field")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_worker: Worker | None = None


def get_worker() -> Worker:
    """The process's worker, built from the environment on first use (not at import)."""
    global _worker
    if _worker is None:
        _worker = Worker(SpeechService(load_settings()))
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """RunPod entry point: `runpod.serverless.start({"handler": handler})`."""
    return await get_worker().handle(job)


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """RunPod streaming entry point (ENABLE_STREAMING=true)."""
    async for item in get_worker().handle_stream(job):
        yield item
