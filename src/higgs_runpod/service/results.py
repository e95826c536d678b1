"""What the speech service hands back, as raw bytes and plain metadata.

    speak  -> Speech: the whole file's bytes, and `metadata()` (the README's response fields)
    stream -> Piece, Piece, ... then StreamEnd (the same metadata, and how many pieces)

Each front puts these in its own wire shape: RunPod base64-encodes the bytes into JSON,
the HTTP front sends them as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from higgs_runpod.request.schema import SpeechRequest
from higgs_runpod.synthesis import audio
from higgs_runpod.synthesis.longform import LongSynthesis
from higgs_runpod.synthesis.progressive import ProgressiveEncoder
from higgs_runpod.timing import ms_since

Progress = Callable[[dict[str, Any]], None]  # where progress reports go


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
        return {**summary(self.synthesis, self.format, self.sample_rate, self.duration_s,
                          self.timings_ms, self.frame_rate), **self.extra}  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """One streamed piece of encoded audio; `frames` counts the frames it completes (held
    back bytes count in the next piece, so the pieces' frames add up)."""

    index: int
    audio: bytes
    format: str
    sample_rate: int
    frames: int


@dataclass(frozen=True)
class StreamEnd:
    """A stream's last item: how many pieces went, and the response's metadata."""

    pieces: int
    metadata: dict[str, Any]


def summary(
    synthesis: LongSynthesis,
    audio_format: str,
    sample_rate: int,
    duration_s: float,
    timings_ms: dict[str, float],
    frame_rate: float,
) -> dict[str, Any]:
    """The response's metadata fields, shared by a whole file and a stream's end."""
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


class FrameCounter:
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


class PieceCounter:
    """Numbers the streamed pieces and notes when the first audio left.

    A piece whose bytes are all held back (a codec's frame, atempo's window) is not sent;
    its frames are counted in the next piece, so the frames of the pieces add up.
    """

    def __init__(self, request: SpeechRequest, hop: int, started: float) -> None:
        self.request = request
        self.hop = hop
        self.started = started
        self.index = 0
        self.frames = 0
        self.first_audio_ms: float | None = None

    def add(self, data: bytes, samples: int) -> Piece | None:
        self.frames += samples // self.hop
        if not data:
            return None
        if self.first_audio_ms is None:
            self.first_audio_ms = ms_since(self.started)
        piece = Piece(self.index, data, self.request.format, self.request.sample_rate,
                      self.frames)  # fmt: skip
        self.index, self.frames = self.index + 1, 0
        return piece


def encode_whole(samples: Any, source_rate: int, request: SpeechRequest) -> tuple[bytes, float]:
    """Speed, sample rate and format as requested; returns the bytes and their duration.

    The same encoder as a stream's, fed at once: a stream of this request joins into
    these bytes (see progressive.py).
    """
    encoder = ProgressiveEncoder(
        request.format, source_rate, request.sample_rate, request.speed, whole=True
    )
    encoded = encoder.feed(samples) + encoder.finish()
    return encoded, encoder.samples_out / request.sample_rate
