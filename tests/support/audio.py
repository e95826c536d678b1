"""Audio for the tests: a sine tone as WAV, base64 text, and FFmpeg's decode of any format."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import soundfile


def make_wav(seconds: float = 1.0, sample_rate: int = 24_000, freq: float = 220.0) -> bytes:
    """A sine tone as 16-bit WAV bytes."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * freq * t), sample_rate, format="WAV")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded(data: bytes, audio_format: str, rate: int) -> np.ndarray:
    """16-bit samples as FFmpeg decodes them (pcm is raw, so read it as such)."""
    if audio_format == "pcm":
        return np.frombuffer(data, "<i2")
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        frames = [*container.decode(audio=0), None]  # None flushes the resampler
        out = [f.to_ndarray().reshape(-1) for fr in frames for f in resampler.resample(fr)]
    return np.concatenate(out) if out else np.zeros(0, "<i2")
