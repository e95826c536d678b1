"""The RunPod handler: a job's `input` in, one JSON object with the audio out.

    input --schema.parse_request--> SpeechRequest --voices--> clips / descriptions
          --prompts--> conversation --engine (off the event loop)--> samples
          --audio.encode--> response

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
from dataclasses import dataclass
from typing import Any

from . import audio, tempo
from .engine import Engine, SamplingParams, Synthesis
from .errors import GenerationCancelled, HiggsRunpodError, RequestError
from .prompts import build_conversation
from .schema import SpeechRequest, parse_request
from .settings import Settings, load_settings
from .voices import VoiceResolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speech:
    """Encoded audio for one request, with what the caller may want to know about it."""

    audio: bytes
    format: str
    sample_rate: int
    duration_s: float
    synthesis: Synthesis
    timings_ms: dict[str, float]

    def metadata(self) -> dict[str, Any]:
        """Every response field except the audio itself (see the README's response table)."""
        busy_s = (self.timings_ms["generate"] + self.timings_ms["decode"]) / 1000.0
        return {
            "format": self.format,
            "content_type": audio.CONTENT_TYPES[self.format],
            "sample_rate": self.sample_rate,
            "duration_s": round(self.duration_s, 3),
            "seed": self.synthesis.seed,
            "usage": {
                "prompt_tokens": self.synthesis.prompt_tokens,
                "generated_tokens": self.synthesis.generated_tokens,
                "audio_frames": self.synthesis.frames,
            },
            "timings_ms": {name: round(value, 1) for name, value in self.timings_ms.items()},
            "real_time_factor": round(busy_s / self.duration_s, 4) if self.duration_s else None,
        }


class Worker:
    """Everything a job needs, built once per process from the settings."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.voices = VoiceResolver(settings)

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job; never raises (RunPod would send the traceback to the caller)."""
        job_id = str(job.get("id", "local"))
        try:
            return await self._run(job.get("input"))
        except RequestError as error:
            log.info("job %s rejected: %s", job_id, error)
            return {"error": str(error)}
        except HiggsRunpodError as error:
            log.error("job %s failed: %s", job_id, error)
            return {"error": str(error)}
        except Exception:
            log.exception("job %s failed with an internal error", job_id)
            return {"error": f"internal error while generating speech (job {job_id}); "
                             "the worker log has the details"}  # fmt: skip

    async def _run(self, raw_input: Any) -> dict[str, Any]:
        request = parse_request(raw_input, self.settings)
        speech = await self.speak(request)
        return {"audio_base64": base64.b64encode(speech.audio).decode("ascii"), **speech.metadata()}

    async def speak(self, request: SpeechRequest, cancel: threading.Event | None = None) -> Speech:
        """A validated request to encoded audio; the model runs off the event loop.

        `cancel` lets a front whose caller went away stop the generation (see Engine).
        """
        started = time.perf_counter()
        conversation = await asyncio.to_thread(self._conversation, request)
        resolve_ms = (time.perf_counter() - started) * 1000.0
        load_ms = await asyncio.to_thread(self.engine.load) * 1000.0
        synthesis = await asyncio.to_thread(
            self.engine.synthesize, conversation, _sampling(request), cancel=cancel
        )
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"cancelled after {synthesis.generated_tokens} decode steps")
        encode_start = time.perf_counter()
        encoded, duration_s = await asyncio.to_thread(_encode, synthesis, request)
        encode_ms = (time.perf_counter() - encode_start) * 1000.0
        return Speech(
            audio=encoded,
            format=request.format,
            sample_rate=request.sample_rate,
            duration_s=duration_s,
            synthesis=synthesis,
            timings_ms={
                "load": load_ms,
                "prepare": resolve_ms + synthesis.prepare_ms,
                "generate": synthesis.generate_ms,
                "decode": synthesis.decode_ms,
                "encode": encode_ms,
                "total": (time.perf_counter() - started) * 1000.0,
            },
        )

    def _conversation(self, request: SpeechRequest) -> list[dict[str, Any]]:
        resolve = self.voices.resolve
        voice = resolve(request.voice, "voice") if request.voice is not None else None
        speakers = (
            {tag: resolve(v, f"speakers.{tag}") for tag, v in request.speakers.items()}
            if request.speakers
            else None
        )
        return build_conversation(
            request.text,
            scene=request.scene,
            voice=voice,
            speakers=speakers,
        )


def _encode(synthesis: Synthesis, request: SpeechRequest) -> tuple[bytes, float]:
    """Speed, sample rate and format as requested; returns the bytes and their duration."""
    samples = tempo.time_stretch(synthesis.samples, synthesis.sample_rate, request.speed)
    samples = audio.resample(samples, synthesis.sample_rate, request.sample_rate)
    encoded = audio.encode(samples, request.sample_rate, request.format)
    return encoded, len(samples) / request.sample_rate


def _sampling(request: SpeechRequest) -> SamplingParams:
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=request.seed,
        max_new_tokens=request.max_new_tokens,
        ras_win_len=request.ras_win_len,
        ras_win_max_num_repeat=request.ras_win_max_num_repeat,
    )


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
