"""Audio in and out: decode any common format, resample, encode the requested format.

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

from .progressive import CONTENT_TYPES, encode, to_pcm16

__all__ = [
    "CONTENT_TYPES", "AudioDecodeError", "DecodedAudio", "decode", "encode", "resample", "to_pcm16",
]  # fmt: skip


class AudioDecodeError(ValueError):
    """The bytes are not audio that FFmpeg can decode."""


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono
    sample_rate: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate


def decode(data: bytes, sample_rate: int, max_seconds: float | None = None) -> DecodedAudio:
    """Decode any FFmpeg-readable clip to float32 mono at `sample_rate`.

    Stops early (and says so) once more than `max_seconds` have been decoded, so a huge
    file cannot make the worker decode it whole.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("contains no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += len(chunk)
                if max_seconds is not None and total > max_seconds * sample_rate:
                    raise AudioDecodeError(f"is longer than {max_seconds:g} seconds")
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise AudioDecodeError("could not be decoded as audio") from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    return DecodedAudio(samples.astype(np.float32, copy=False), sample_rate)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling (torchaudio's sinc interpolation)."""
    if from_rate == to_rate:
        return samples
    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return torchaudio.functional.resample(tensor, from_rate, to_rate).numpy()
