"""What the HTTP front keeps beside the speech service: admissions, metrics, load state.

One `Service` per app, at `app.state.service`; the routes (http_api, http_voices) and the
WebSocket session (speech_ws) all reach the speech service through it.
"""

from __future__ import annotations

import asyncio
import logging

from higgs_runpod.container.health import mark_ready
from higgs_runpod.errors import ApiError
from higgs_runpod.fronts.http_metrics import Metrics
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings

log = logging.getLogger(__name__)


class Service:
    """The speech service plus what the HTTP side keeps: admission count, metrics, load state."""

    def __init__(self, settings: Settings, speech: SpeechService) -> None:
        self.settings = settings
        self.speech = speech
        self.metrics = Metrics()
        self.in_flight = 0
        self.load_failed = False

    def start_loading(self) -> asyncio.Future[None] | None:
        """Load the model in the background so /ping can answer 204 meanwhile.

        It loads off the event loop, as generation's engine calls do (see SpeechService).
        """
        if self.settings.lazy_load or self.speech.engine.is_loaded:
            return None

        def load() -> None:
            try:
                log.info("model loaded in %.1f s", self.speech.engine.load())
                mark_ready(self.settings.ready_file)  # the image's health check reads it
            except Exception:
                self.load_failed = True
                log.exception("loading the model failed")

        return asyncio.ensure_future(asyncio.to_thread(load))

    @property
    def ready(self) -> bool:
        return self.settings.lazy_load or self.speech.engine.is_loaded

    def admit(self) -> None:
        """Take one of HTTP_MAX_IN_FLIGHT places for a speech request, or refuse with 429."""
        if self.in_flight >= self.settings.http_max_in_flight:
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                f"the worker is busy ({self.in_flight} requests in flight); retry shortly",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self._count(+1)

    def release(self) -> None:
        self._count(-1)

    def _count(self, delta: int) -> None:
        self.in_flight += delta
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.queue_depth.set(max(self.in_flight - self.speech.engine.slots, 0))
