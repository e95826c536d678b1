"""Hostile job inputs, shared by the tests and bench/abuse.py.

    cases(hostile_url)   -> the cases: a job `input`, the field its error must name (None:
                            the job must succeed) and an optional top-level `s3Config`
    openai_body(input)   -> the same input as an OpenAI `/v1/audio/speech` body
    HostileServer()      -> serves the hostile payloads on 127.0.0.1 (`.url`, `.close()`)
    rebinding(name, a, b) -> a `socket.getaddrinfo` whose `name` is `a` once, then `b`

The payloads are real: an 809-byte brotli body that expands to 1 GiB, an 8 KB FLAC at
10 Hz with 65535-sample frames, an `ffconcat` playlist, a server that drips a byte at a
time or keeps a steady rate that never finishes, a redirect to a private address.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import io
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import brotli
import numpy as np
import soundfile

GIB = 1 << 30
DRIP_EVERY_S = 0.2


@dataclass(frozen=True)
class Case:
    name: str
    input: dict[str, Any]
    field: str | None  # the field the error must name; None: the job must succeed
    s3_config: dict[str, str] | None = None


def wav(seconds: float = 1.0, sample_rate: int = 24_000) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * 220 * t), sample_rate, format="WAV")
    return buffer.getvalue()


@functools.cache
def brotli_bomb() -> bytes:
    """1 GiB of zeros as 809 bytes of brotli (compressed a MiB at a time: little memory)."""
    compressor = brotli.Compressor(quality=4, lgwin=24)
    zeros = bytes(1 << 20)
    parts = [compressor.process(zeros) for _ in range(GIB // len(zeros))]
    return b"".join(parts) + compressor.finish()


@functools.cache
def flac_bomb(rate: int = 10, frames: int = 20) -> bytes:
    """A FLAC at `rate` Hz of 65535-sample frames: 8 KB that is 36 hours long at 10 Hz, and
    157 million samples per frame once resampled to 24 kHz."""
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as container:
        stream = container.add_stream("flac", rate=rate, options={"frame_size": "65535"})
        stream.layout, stream.format = "mono", "s16"
        silence = np.zeros((1, 65535), np.int16)
        for index in range(frames):
            frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, index * 65535
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def ffconcat(name: str) -> bytes:
    """A playlist FFmpeg's concat demuxer follows: it opens `name` relative to the cwd."""
    return f"ffconcat version 1.0\nfile {name}\n".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class HostileServer:
    """The payloads on http://127.0.0.1:PORT/ (a thread per connection):

    /clip.wav    a good 1 s clip                 /brotli   the brotli bomb, Content-Encoding: br
    /flac-bomb   the 10 Hz FLAC                  /drip     a 10 MB body, a byte every 0.2 s
    /steady      10 MB at 40 kB/s (minutes)      /redirect 302 to http://169.254.169.254/
    /s3/...      an S3 look-alike answering every request with an error of its own

    `drips_open` counts the /drip and /steady connections still being written to;
    `requests` holds every request's headers (with its path as `:path`).
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        brotli_bomb()  # a second of compressing, done before any client waits on it
        self.drips_open = 0
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler())
        if tls is not None:  # https: the handshake runs on accept
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hostile = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                hostile.requests.append({":path": self.path, **self.headers})
                if self.path == "/clip.wav":
                    self._send(wav())
                elif self.path == "/brotli":
                    self._send(brotli_bomb(), {"Content-Encoding": "br"})
                elif self.path == "/flac-bomb":
                    self._send(flac_bomb(), {"Content-Type": "audio/flac"})
                elif self.path == "/drip":
                    self._trickle(piece=1, every_s=DRIP_EVERY_S)
                elif self.path == "/steady":
                    self._trickle(piece=4000, every_s=0.1)
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path.startswith("/s3/"):
                    self._s3_error()
                else:
                    self.send_error(404)

            def do_PUT(self) -> None:
                hostile.requests.append({":path": self.path, **self.headers})
                self._s3_error()

            def _s3_error(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = (b"<?xml version='1.0'?><Error><Code>InternalCode-db7</Code><Message>"
                        b"db password is hunter2</Message></Error>")  # fmt: skip
                self._send(body, {"Content-Type": "application/xml"}, status=400)

            def _send(self, body: bytes, headers: dict[str, str] | None = None,
                      status: int = 200) -> None:  # fmt: skip
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(OSError):  # refused after the headers: as wanted
                    self.wfile.write(body)

            def _trickle(self, piece: int, every_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "10000000")
                self.end_headers()
                with hostile._lock:
                    hostile.drips_open += 1
                try:
                    while not hostile._stop.wait(every_s):
                        self.wfile.write(b"\0" * piece)
                        self.wfile.flush()
                except OSError:
                    pass  # the client went away: what a bounded download does
                finally:
                    with hostile._lock:
                        hostile.drips_open -= 1
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _with_voice(voice: Any) -> dict[str, Any]:
    return {"text": "Hello.", "max_new_tokens": 20, "seed": 1, "voice": voice}


def _url_voice(url: str) -> dict[str, Any]:
    return _with_voice({"audio_url": url, "transcript": "Hello."})


def _b64_voice(data: bytes) -> dict[str, Any]:
    return _with_voice({"audio_base64": b64(data), "transcript": "Hello."})


def cases(hostile_url: str) -> list[Case]:
    """Every input case; `hostile_url` is a running HostileServer's `.url`.

    No case carries an `s3Config`: RunPod's local API server (`serve`) passes a job's
    `input` only, so tests/test_storage.py sends those to the handler itself.
    """
    url = "voice.audio_url"
    return [
        Case("url-clip-ok", _url_voice(f"{hostile_url}/clip.wav"), None),
        Case("brotli-bomb", _url_voice(f"{hostile_url}/brotli"), url),
        Case("flac-bomb-url", _url_voice(f"{hostile_url}/flac-bomb"), url),
        Case("flac-bomb-base64", _b64_voice(flac_bomb()), "voice.audio_base64"),
        Case("ffconcat-base64", _b64_voice(ffconcat("voice.wav")), "voice.audio_base64"),
        Case("drip-download", _url_voice(f"{hostile_url}/drip"), url),
        Case("steady-download", _url_voice(f"{hostile_url}/steady"), url),
        Case("redirect-to-private", _url_voice(f"{hostile_url}/redirect"), url),
        Case("metadata-address", _url_voice("http://169.254.169.254/latest/meta-data/"), url),
        Case("nat64-loopback", _url_voice("https://[64:ff9b::7f00:1]/a.wav"), url),
        Case("v4-compatible-loopback", _url_voice("https://[::7f00:1]/a.wav"), url),
        Case("v4-mapped-private", _url_voice("https://[::ffff:10.0.0.1]/a.wav"), url),
        Case("url-port-99999", _url_voice("http://127.0.0.1:99999/a.wav"), url),
        Case("url-open-bracket", _url_voice("https://[::1"), url),
        Case("url-control-char", _url_voice("https://exa\x01mple.com/a.wav"), url),
        *work_cases(hostile_url),
    ]  # fmt: skip


def work_cases(hostile_url: str) -> list[Case]:
    """Unbounded work per request and zero-frame results: chunks, frames, prompt tokens,
    speakers (no download before they are checked), speaker numbers, empty audio."""
    clip = {"audio_url": f"{hostile_url}/clip.wav", "transcript": "Hello."}
    many = {f"SPEAKER{n}": {**clip, "audio_url": f"{clip['audio_url']}?{n}"} for n in range(20_000)}
    unused = {"SPEAKER0": {"description": "a calm voice"}, "SPEAKER1": clip}
    return [
        Case("100k-without-spaces", {"text": "x" * 100_000}, "max_new_tokens"),
        Case("100k-emoji", {"text": "\U0001f600" * 100_000, "max_new_tokens": 4}, "text"),
        Case("8000-turns", {"text": "[SPEAKER0] a" * 8000}, "max_new_tokens"),
        Case("20000-speakers", {"text": "[SPEAKER0] Hi.", "speakers": many}, "speakers"),
        Case("unused-speaker-url", {"text": "[SPEAKER0] Hi.", "speakers": unused}, "speakers"),
        Case("5000-digit-speaker", {"text": "[SPEAKER" + "9" * 5000 + "] hi",
             "max_new_tokens": 4, "chunking": {"context_chunks": 0}}, None),
        Case("zero-frames-wav", {"text": "Hi.", "max_new_tokens": 1, "format": "wav"}, None),
        Case("zero-frames-mp3", {"text": "Hi.", "max_new_tokens": 1, "format": "mp3"}, "format"),
    ]  # fmt: skip


def openai_body(job_input: dict[str, Any]) -> dict[str, Any]:
    """The job input as an OpenAI speech body (text -> input, format -> response_format)."""
    body = {"model": "tts-1", "response_format": "wav"}
    renamed = {"text": "input", "format": "response_format"}
    body.update({renamed.get(name, name): value for name, value in job_input.items()})
    return body


def rebinding(name: str, first: str, then: str) -> Callable[..., Any]:
    """A stand-in for `socket.getaddrinfo` playing a rebinding DNS server: `name` resolves
    to `first` once and to `then` ever after; other names resolve as usual."""
    real_getaddrinfo = socket.getaddrinfo
    answers = iter([first])

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == name:
            return real_getaddrinfo(next(answers, then), *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    return getaddrinfo


def wait_for(condition: Any, timeout_s: float) -> bool:
    """Poll `condition()` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())
