"""Issue 14: text in over a WebSocket, audio out as it is made (`/v1/audio/speech/stream`).

The server is the real app under the CLI's uvicorn config, in a thread of this process, on
the session's tiny model; the client is the `websockets` library. Audio is checked with
FFmpeg (PyAV) and by its exact sample count.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from higgs_runpod.fronts.speech_ws import STREAM_ROUTE, Segmenter
from higgs_runpod.request.chunking import segment_end
from higgs_runpod.service.planning import GenerationPlan
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.synthesis.longform import LongSynthesis
from support.audio import b64, make_wav
from support.engine import EncodeSpy
from support.servers import ThreadServer

KEY = "ws-key-1618"
HOP = 960  # samples of one 40 ms frame at 24 kHz
PIECES = ["Hello there. ", "This is the second ", "sentence, said ", "in pieces. And ", "the end."]


def config(**fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "voice": "alice", "response_format": "wav", "seed": 4,
            "max_new_tokens": 20, **fields}  # fmt: skip


@dataclass
class Received:
    """What a session sent back, with when the first audio came."""

    audio: bytearray = field(default_factory=bytearray)
    events: list[dict[str, Any]] = field(default_factory=list)
    first_audio_at: float | None = None
    close_code: int | None = None

    @property
    def segments(self) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == "segment"]


async def collect(socket: ClientConnection, received: Received) -> None:
    try:
        async for message in socket:
            if isinstance(message, bytes):
                if received.first_audio_at is None:
                    received.first_audio_at = time.monotonic()
                received.audio += message
            else:
                received.events.append(json.loads(message))
    except ConnectionClosed:
        pass
    received.close_code = socket.close_code


async def session(
    url: str, messages: list[dict[str, Any]], gap_s: float = 0.0, **connect_args: Any
) -> tuple[Received, list[float]]:
    """Send `messages` `gap_s` apart while collecting; returns what came and when each
    message went."""
    received = Received()
    async with connect(url, open_timeout=10, **connect_args) as socket:
        reader = asyncio.ensure_future(collect(socket, received))
        sent_at = []
        for message in messages:
            try:
                await socket.send(json.dumps(message))
            except ConnectionClosed:  # the server ended the session: read why
                break
            sent_at.append(time.monotonic())
            await asyncio.sleep(gap_s)
        await asyncio.wait_for(reader, timeout=120)
    return received, sent_at


def ws_url(server: ThreadServer) -> str:
    return f"ws://127.0.0.1:{server.port}{STREAM_ROUTE}"


@pytest.fixture(scope="module")
def server(settings: Settings, speech: SpeechService) -> Iterator[ThreadServer]:
    running = ThreadServer(settings.model_copy(update={"higgs_api_key": None}), speech)
    yield running
    running.stop()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def test_segments_end_at_sentences_or_after_the_word_budget() -> None:
    assert segment_end("Hello there. This", 100) == (12, 13)
    assert segment_end("Hello there.", 100) is None  # "3." may go on as "3.14"
    assert segment_end("one two three four", 3) == (13, 14)
    assert segment_end("one two three", 3) is None  # "three" may go on as "threesome"
    segmenter = Segmenter(max_words=100)
    assert [s for piece in PIECES for s in segmenter.push(piece)] == [
        "Hello there.",
        "This is the second sentence, said in pieces.",
    ]
    assert segmenter.flush() == ["And the end."]
    assert segmenter.flush() == []


def test_text_in_pieces_audio_before_the_last_piece(server: ThreadServer) -> None:
    """5 pieces 200 ms apart: the first sentence's audio comes before the last piece goes;
    the audio lasts exactly the segments' frames, and the segments come in order."""
    messages = [config(), *({"text": piece} for piece in PIECES), {"close": True}]
    received, sent_at = run(session(ws_url(server), messages, gap_s=0.2))
    assert received.close_code == 1000
    last_piece_sent = sent_at[len(PIECES)]  # after the config and four pieces
    assert received.first_audio_at is not None and received.first_audio_at < last_piece_sent
    segments = received.segments
    assert [s["index"] for s in segments] == [0, 1, 2]
    assert [s["text"] for s in segments] == [
        "Hello there.",
        "This is the second sentence, said in pieces.",
        "And the end.",
    ]
    frames = sum(s["frames"] for s in segments)
    decoded = audio.decode(bytes(received.audio), 24_000)
    assert len(decoded.samples) == frames * HOP > 0
    done = received.events[-1]
    assert done["type"] == "done"
    assert done["usage"]["audio_frames"] == frames
    assert done["duration_s"] == pytest.approx(frames * 0.04, abs=0.001)
    assert done["first_audio_ms"] > 0
    assert received.events.index(done) == len(received.events) - 1


def test_mp3_streams_as_one_file_and_flush_cuts_a_segment(server: ThreadServer) -> None:
    messages = [config(response_format="mp3"), {"text": "No sentence end yet"},
                {"flush": True}, {"text": "Then more."}, {"close": True}]  # fmt: skip
    received, _ = run(session(ws_url(server), messages))
    assert [s["text"] for s in received.segments] == ["No sentence end yet", "Then more."]
    frames = sum(s["frames"] for s in received.segments)
    decoded = audio.decode(bytes(received.audio), 24_000)
    assert decoded.duration_s == pytest.approx(frames * 0.04, abs=0.08)  # codec padding
    assert received.events[-1]["type"] == "done"


def test_a_dialogue_config_with_speakers_is_accepted(server: ThreadServer) -> None:
    """`speakers` must be the tags a text uses; the config, checked before any text, is
    checked as a text that uses them all."""
    dialogue = {**config(), "speakers": {"SPEAKER0": "alice", "SPEAKER1": "alice"}}
    del dialogue["voice"]
    messages = [dialogue, {"text": "[SPEAKER0] Hi. [SPEAKER1] Hello."}, {"close": True}]
    received, _ = run(session(ws_url(server), messages))
    assert received.events[-1]["type"] == "done", received.events


def error_of(received: Received) -> str:
    errors = [event["message"] for event in received.events if event["type"] == "error"]
    assert len(errors) == 1, received.events
    assert received.events[-1]["type"] == "error"
    return errors[0]


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (config(voice="bob"), "unknown voice 'bob'"),
        (config(input="Hi."), "config.input: not allowed here"),
        (config(save_voice={"name": "kept"}), "config.save_voice: not allowed here"),
        (config(remember_take=True), "config.remember_take: not allowed here"),
        (config(temperature=9), "temperature: input should be less than or equal to 2"),
        ({"voice": "alice"}, "model: is required"),
        ([1, 2], "the first message must be a JSON object"),
    ],
)
def test_bad_config_is_a_clear_error_and_a_closed_socket(
    server: ThreadServer, first: Any, message: str
) -> None:
    received, _ = run(session(ws_url(server), [first]))
    assert message in error_of(received)
    assert received.close_code == 1008
    assert not received.audio


def test_bad_messages_and_text_over_the_limits(settings: Settings, speech: SpeechService) -> None:
    limited = settings.model_copy(update={
        "higgs_api_key": None, "ws_max_message_chars": 40, "ws_max_buffered_chars": 60,
        "ws_max_session_frames": 12, "ws_idle_timeout_s": 0.5,
    })  # fmt: skip
    server = ThreadServer(limited, speech)
    url = ws_url(server)
    cases = [
        (
            [{"text": "x" * 41}],
            "one message holds 41 characters; the limit is 40 (WS_MAX_MESSAGE_CHARS)",
        ),
        (
            [{"text": "word " * 8}, {"text": "word " * 5}],
            "65 characters are waiting to be spoken; the limit is 60 (WS_MAX_BUFFERED_CHARS)",
        ),
        (
            [{"text": "One. Two. "}, {"close": True}],
            "the session's audio reached its limit of 12 frames (WS_MAX_SESSION_FRAMES)",
        ),
        ([{"text": 5}], "text: must be a string"),
        ([{"speak": "hi"}], "unknown message field 'speak'"),
        ([], "no message for 0.5 s (WS_IDLE_TIMEOUT_S)"),
    ]
    try:
        for messages, message in cases:
            received, _ = run(session(url, [config(), *messages]))
            assert message in error_of(received), messages
            assert received.close_code == 1008
        assert server.service.in_flight == 0
    finally:
        server.stop()


def test_a_sessions_text_is_bounded_in_all(settings: Settings, speech: SpeechService) -> None:
    limited = settings.model_copy(update={"higgs_api_key": None, "max_long_text_chars": 50})
    server = ThreadServer(limited, speech)
    try:
        received, _ = run(
            session(ws_url(server), [config(), {"text": "a " * 20}, {"text": "b " * 8}])
        )
        assert "the session has sent 56 characters; the limit is 50 (MAX_LONG_TEXT_CHARS)" in (
            error_of(received)
        )
        assert received.close_code == 1008
    finally:
        server.stop()


class GenerationLog(SpeechService):
    """The real speech service, noting in `log` when each segment's generation starts and
    ends (the session calls `generate` once per segment, with the segment as its chunk)."""

    def __init__(self, settings: Settings, engine: Engine, log: list[tuple[str, str]]) -> None:
        super().__init__(settings, engine)
        self.log = log

    async def generate(self, plan: GenerationPlan, *args: Any, **kwargs: Any) -> LongSynthesis:
        text = plan.chunks[0].text
        self.log.append(("generate", text))
        try:
            return await super().generate(plan, *args, **kwargs)
        finally:
            self.log.append(("generated", text))


def noting_sends(log: list[tuple[str, str]]) -> Callable[[ASGIApp], ASGIApp]:
    """ASGI middleware: each WebSocket message noted in `log` once uvicorn has written it to
    the socket's transport, as "audio" or its JSON type."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def noted(scope: Scope, receive: Receive, send: Send) -> None:
            async def noting_send(message: Message) -> None:
                await send(message)
                if message["type"] == "websocket.send":
                    text = message.get("text")
                    log.append(("sent", "audio" if text is None else json.loads(text)["type"]))

            await app(scope, receive, noting_send)

        return noted

    return wrap


def test_the_next_segment_generates_while_one_is_being_sent(
    settings: Settings, engine: Engine
) -> None:
    """Two sentences at once: the second generates while the first's last audio is sent.

    Both notes are taken on the server's event loop, so their order is the server's own:
    `generate` calls of the real service, and messages as uvicorn wrote them. Were segments
    generated only once the one before had gone (`_generate` awaiting each segment's send),
    "generate" of the second would come after the first's last audio, and this would fail."""
    log: list[tuple[str, str]] = []
    plain = settings.model_copy(update={"higgs_api_key": None})
    server = ThreadServer(plain, GenerationLog(plain, engine, log), noting_sends(log))
    first, second = "The first sentence is here.", "And here the second one."
    messages = [config(max_new_tokens=100), {"text": f"{first} {second}", "close": True}]
    try:
        received, _ = run(session(ws_url(server), messages))
    finally:
        server.stop()

    assert [s["text"] for s in received.segments] == [first, second]
    assert received.events[-1]["type"] == "done"
    segment_sent = log.index(("sent", "segment"))
    last_audio = max(i for i, entry in enumerate(log[:segment_sent]) if entry == ("sent", "audio"))
    assert log.index(("generate", second)) < last_audio < log.index(("generated", second)), log
    # and the first's audio began going out while it generated: sending spans both
    generating_first = log[log.index(("generate", first)) : log.index(("generated", first))]
    assert ("sent", "audio") in generating_first, log


def test_a_message_over_the_size_limit_is_an_error_then_close_1009(
    settings: Settings, speech: SpeechService
) -> None:
    """A message over HTTP_MAX_BODY_BYTES, whole or in fragments, is refused from its frame
    headers: the client hears why, then the socket closes; one at the limit is read."""
    limit = 2048
    limited = settings.model_copy(update={"higgs_api_key": None, "http_max_body_bytes": limit})
    server = ThreadServer(limited, speech)
    at_limit = json.dumps({"pad": "x" * (limit - len('{"pad": ""}'))})
    assert len(at_limit.encode()) == limit

    async def send(*messages: str | list[str]) -> Received:
        received = Received()
        async with connect(ws_url(server), open_timeout=10) as socket:
            reader = asyncio.ensure_future(collect(socket, received))
            for message in messages:
                await socket.send(message if isinstance(message, str) else iter(message))
            await asyncio.wait_for(reader, timeout=60)
        return received

    try:
        read = run(send(json.dumps(config()), at_limit))
        assert "unknown message field 'pad'" in error_of(read)  # the session parsed it
        assert read.close_code == 1008
        half = "x" * (limit // 2)
        for too_big in (at_limit + " ", [f'{{"text": "{half}', f'{half}"}}']):
            refused = run(send(json.dumps(config()), too_big))
            assert (
                f"a message is larger than {limit} bytes, the limit (HTTP_MAX_BODY_BYTES)"
                in error_of(refused)
            )
            assert refused.close_code == 1009 and not refused.audio
        deadline = time.monotonic() + 10
        while server.service.in_flight:
            assert time.monotonic() < deadline, "the refused sessions were not released"
            time.sleep(0.05)
        served, _ = run(session(ws_url(server), [config(), {"text": "Fine."}, {"close": True}]))
        assert served.events[-1]["type"] == "done"
    finally:
        server.stop()


def test_a_library_voice_speaks_from_its_stored_codes(
    settings: Settings, speech: SpeechService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As over HTTP and the queue: a library voice's codes come from its codes.pt, for every
    segment, and the audio tokenizer encodes nothing (the done event says how they came)."""
    library = settings.model_copy(update={"higgs_api_key": None, "voices_path": tmp_path})
    server = ThreadServer(library, SpeechService(library, speech.engine))
    clip = make_wav(seconds=1.2, freq=333.0)  # a clip no other test has put in the cache
    try:
        voice = {"name": "stored", "transcript": "A tone.", "audio_base64": b64(clip)}
        created = httpx.post(f"{server.url}/v1/audio/voices", json=voice, timeout=60)
        assert created.status_code == 201, created.text
        assert (tmp_path / "stored" / "codes.pt").is_file()
        spy = EncodeSpy(speech.engine, monkeypatch)
        messages = [config(voice="stored"), {"text": "One. Two."}, {"close": True}]
        received, _ = run(session(ws_url(server), messages))
        done = received.events[-1]
        assert done["type"] == "done", received.events
        assert [s["text"] for s in received.segments] == ["One.", "Two."]
        assert done["voice_codes"] == {"library": 1, "memory": 0, "disk": 0, "encoded": 0}
        assert spy.calls == 0
    finally:
        server.stop()


def test_key_by_header_or_subprotocol(settings: Settings, speech: SpeechService) -> None:
    server = ThreadServer(settings.model_copy(update={"higgs_api_key": SecretStr(KEY)}), speech)
    messages = [config(), {"text": "Keyed."}, {"close": True}]
    try:
        refused, _ = run(session(ws_url(server), messages, subprotocols=["wrong-key"]))
        assert "missing or wrong API key" in error_of(refused)
        assert refused.close_code == 1008 and not refused.audio
        for how in ({"subprotocols": [KEY]}, {"additional_headers": {"X-API-Key": KEY}}):
            received, _ = run(session(ws_url(server), messages, **how))
            assert received.events[-1]["type"] == "done", how
            assert received.audio
    finally:
        server.stop()


def test_disconnect_mid_stream_stops_generation(server: ThreadServer) -> None:
    engine = server.service.speech.engine
    metrics = server.service.metrics.registry
    cancelled = metrics.get_sample_value("higgs_speech_cancelled_total")

    async def leave_after_first_audio() -> None:
        async with connect(ws_url(server)) as socket:
            await socket.send(json.dumps(config(max_new_tokens=2048)))
            await socket.send(json.dumps({"text": "Go on and on.", "flush": True}))
            assert isinstance(await asyncio.wait_for(socket.recv(), 60), bytes)
            assert engine.running == 1

    started = time.monotonic()
    run(leave_after_first_audio())
    deadline = time.monotonic() + 10
    while engine.running or server.service.in_flight:
        assert time.monotonic() < deadline, "generation did not stop"
        time.sleep(0.05)
    assert time.monotonic() - started < 15  # 2048 steps would take far longer
    assert metrics.get_sample_value("higgs_speech_cancelled_total") == cancelled + 1
    received, _ = run(session(ws_url(server), [config(), {"text": "Again."}, {"close": True}]))
    assert received.events[-1]["type"] == "done"  # the engine serves the next one
