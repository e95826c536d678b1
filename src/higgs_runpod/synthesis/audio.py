"""Audio in and out: decode common audio files, resample, encode the requested format.

PyAV (FFmpeg) does all of it: one library for every container and codec, so what the
worker accepts as a reference clip and what it returns are decoded and encoded the same
way. Encoding, streamed or not, is progressive.py's (re-exported here). Samples are
float32 mono in [-1, 1] everywhere inside the worker.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import torch
import torchaudio.functional

from higgs_runpod.errors import AudioDecodeError
from higgs_runpod.synthesis.progressive import CONTENT_TYPES, encode, to_pcm16

__all__ = [
    "CONTENT_TYPES", "AudioDecodeError", "DecodedAudio", "decode", "encode", "resample", "to_pcm16",
]  # fmt: skip


# FFmpeg's demuxers for audio files (`mov` is MP4/M4A). Anything else is refused before its
# header is read: some demuxers follow what a file names (an `ffconcat` playlist opens
# files relative to the worker's directory) and others make audio of anything.
DEMUXERS = ("wav", "w64", "flac", "mp3", "ogg", "mov", "matroska", "aac", "aiff", "caf")
MIN_INPUT_RATE = 8000  # below it, a few bytes of header expand ~3000-fold on resampling
MAX_INPUT_RATE = 384_000


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def decode(data: bytes, sample_rate: int, max_seconds: float | None = None) -> DecodedAudio:
    """Decode a clip in one of the DEMUXERS' containers to float32 mono at `sample_rate`.

    Every frame's rate and the running duration are checked before the frame is resampled,
    so neither a long clip nor a tiny rate (which resampling multiplies) costs more than
    one frame's work past `max_seconds`.
    """
    options = {"format_whitelist": ",".join(DEMUXERS)}
    try:
        with av.open(io.BytesIO(data), mode="r", options=options) as container:
            if not container.streams.audio:
                raise AudioDecodeError("contains no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks: list[np.ndarray] = []
            seconds = 0.0
            for frame in container.decode(stream):
                if not MIN_INPUT_RATE <= frame.sample_rate <= MAX_INPUT_RATE:
                    raise AudioDecodeError(
                        f"has a sample rate of {frame.sample_rate} Hz; accepted: "
                        f"{MIN_INPUT_RATE} to {MAX_INPUT_RATE} Hz"
                    )
                seconds += frame.samples / frame.sample_rate
                if max_seconds is not None and seconds > max_seconds:
                    raise AudioDecodeError(f"is longer than {max_seconds:g} seconds")
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise AudioDecodeError(
            "could not be decoded as audio (accepted containers: WAV, FLAC, MP3, Ogg, "
            "MP4/M4A, Matroska/WebM, AAC, AIFF, CAF)"
        ) from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return DecodedAudio(samples.astype(np.float32, copy=False), sample_rate)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's sinc interpolation)."""
    if from_rate == to_rate:
        return samples
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return torchaudio.functional.resample(tensor, from_rate, to_rate).numpy()
