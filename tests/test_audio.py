"""Encoding every format and decoding it back with FFmpeg (PyAV), a real decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from higgs_runpod.synthesis import audio

TONE = (0.3 * np.sin(2 * np.pi * 440 * np.arange(24_000) / 24_000)).astype(np.float32)


@pytest.mark.parametrize("audio_format", ["wav", "flac", "mp3", "opus", "aac"])
@pytest.mark.parametrize("sample_rate", [16_000, 24_000, 48_000])
def test_encoded_audio_decodes_to_the_same_length(audio_format: str, sample_rate: int) -> None:
    samples = audio.resample(TONE, 24_000, sample_rate)
    encoded = audio.encode(samples, sample_rate, audio_format)
    decoded = audio.decode(encoded, sample_rate)
    # Lossy codecs add up to a frame of priming/padding (AAC: 1024 samples at each end).
    assert decoded.duration_s == pytest.approx(1.0, abs=0.1)
    if audio_format in ("wav", "flac"):
        assert len(decoded.samples) == len(samples)
        assert np.max(np.abs(decoded.samples - samples)) < 1e-3


def test_pcm_is_raw_little_endian_int16() -> None:
    encoded = audio.encode(TONE, 24_000, "pcm")
    assert len(encoded) == 2 * len(TONE)
    restored = np.frombuffer(encoded, dtype="<i2") / 32767.0
    assert np.max(np.abs(restored - TONE)) < 1e-4


def test_decode_downmixes_and_resamples() -> None:
    stereo = np.stack([TONE, TONE], axis=1)
    buffer = io.BytesIO()
    soundfile.write(buffer, stereo, 24_000, format="FLAC")
    decoded = audio.decode(buffer.getvalue(), 16_000)
    assert decoded.samples.ndim == 1
    assert decoded.sample_rate == 16_000
    assert decoded.duration_s == pytest.approx(1.0, abs=0.01)


def test_decode_rejects_garbage_and_overlong_audio() -> None:
    with pytest.raises(audio.AudioDecodeError, match="could not be decoded"):
        audio.decode(b"not audio at all" * 64, 24_000)
    long_clip = audio.encode(np.zeros(24_000 * 5, dtype=np.float32), 24_000, "wav")
    with pytest.raises(audio.AudioDecodeError, match="longer than 2 seconds"):
        audio.decode(long_clip, 24_000, max_seconds=2)
