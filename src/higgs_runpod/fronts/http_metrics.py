"""Prometheus metrics of the HTTP server (`GET /metrics`), one registry per app.

A registry per app (not prometheus_client's global one) keeps several apps in one process,
as in the tests, from sharing or clashing over counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST
_GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
_FIRST_AUDIO_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10)


class Metrics:
    """Counters the server updates; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "higgs_http_requests",
            "HTTP requests by route and status code (errors are the 4xx and 5xx statuses).",
            ["route", "status"],
            registry=self.registry,
        )
        self.audio_seconds = Counter(
            "higgs_audio_seconds", "Seconds of audio sent to callers.", registry=self.registry
        )
        self.generation_seconds = Histogram(
            "higgs_generation_seconds",
            "Wall time of one speech request from admission to encoded audio.",
            buckets=_GENERATION_BUCKETS,
            registry=self.registry,
        )
        self.first_audio_seconds = Histogram(
            "higgs_time_to_first_audio_seconds",
            "From admission to the first audio bytes, by transport (http: the chunked or SSE "
            "speech route; websocket: the first segment of a /v1/audio/speech/stream session).",
            ["transport"],
            buckets=_FIRST_AUDIO_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "higgs_speech_in_flight",
            "Speech requests admitted and not finished (generating or waiting for the engine).",
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "higgs_speech_queue_depth",
            "Admitted speech requests beyond the engine's decode slots (MAX_BATCH_SIZE, or fewer "
            "if the KV cache holds fewer): at least this many wait for a slot.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "higgs_speech_rejected",
            "Speech requests refused with 429 because HTTP_MAX_IN_FLIGHT were admitted.",
            registry=self.registry,
        )
        self.cancelled = Counter(
            "higgs_speech_cancelled",
            "Speech requests whose client disconnected; their generation was stopped.",
            registry=self.registry,
        )
        self.prompt_cache_tokens = Gauge(
            "higgs_prompt_cache_tokens",
            "Tokens of recent prompts whose keys and values the engine holds now.",
            registry=self.registry,
        )
        self.prompt_cache_reused_tokens = Gauge(
            "higgs_prompt_cache_reused_tokens",
            "Prompt tokens taken from the prompt cache instead of prefilled, since the worker "
            "started (a total: read its rate).",
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "higgs_model_loaded", "1 once the model is loaded.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count every response by route and status (pure ASGI, so it leaves
    streaming and disconnect handling alone)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route, str(status)).inc()
