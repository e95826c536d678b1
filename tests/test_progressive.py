"""The progressive encoder: pieces in, only new bytes out, every prefix playable, and the
joined pieces the same file as one encode of the whole clip (decoded back with FFmpeg)."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_runpod.request.schema import AUDIO_FORMATS
from higgs_runpod.synthesis.progressive import CONTENT_TYPES, ProgressiveEncoder, encode
from support.audio import decoded

RATE = 24_000
TONE = (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * RATE) / RATE)).astype(np.float32)
CUTS = [4800, 4800 + 24_000, 4800 + 2 * 12_000 + 100]  # 200 ms, then uneven pieces
FORMATS = ["wav", "flac", "mp3", "opus", "aac", "pcm"]


def streamed(audio_format: str, rate: int, speed: float) -> list[bytes]:
    encoder = ProgressiveEncoder(audio_format, RATE, rate, speed)
    pieces = [encoder.feed(part) for part in np.split(TONE, CUTS)]
    return [*pieces, encoder.finish()]


@pytest.mark.parametrize("audio_format", FORMATS)
@pytest.mark.parametrize(("rate", "speed"), [(24_000, 1.0), (16_000, 1.0), (48_000, 1.5)])
def test_joined_pieces_are_the_whole_file(audio_format: str, rate: int, speed: float) -> None:
    pieces = streamed(audio_format, rate, speed)
    whole = encode(TONE, rate, audio_format, source_rate=RATE, speed=speed)
    joined = b"".join(pieces)
    assert any(pieces[:-1]), "bytes leave before the end"
    if audio_format in ("wav", "flac"):  # only the header's length fields differ
        assert len(joined) == len(whole)
        assert sum(a != b for a, b in zip(joined, whole, strict=True)) <= 24
    else:
        assert joined == whole
    assert np.array_equal(decoded(joined, audio_format, rate), decoded(whole, audio_format, rate))


@pytest.mark.parametrize("audio_format", FORMATS)
def test_every_prefix_is_playable(audio_format: str) -> None:
    pieces = streamed(audio_format, RATE, 1.0)
    lengths = []
    for end in range(1, len(pieces) + 1):
        prefix = b"".join(pieces[:end])
        lengths.append(len(decoded(prefix, audio_format, RATE)))
    assert lengths == sorted(lengths) and lengths[0] > 0
    assert lengths[-1] >= len(TONE)  # lossy codecs add priming and padding


@pytest.mark.parametrize("speed", [0.25, 0.8, 2.0])
def test_speed_streams_with_the_duration_scaled(speed: float) -> None:
    pieces = streamed("pcm", RATE, speed)
    samples = len(b"".join(pieces)) // 2
    assert samples / RATE == pytest.approx(2.0 / speed, rel=0.03)
    assert sum(map(len, pieces[:-1])) > 0  # audio left before the end, not only at finish


def test_wav_stream_has_open_lengths_and_the_whole_file_real_ones() -> None:
    stream = b"".join(streamed("wav", RATE, 1.0))
    whole = encode(TONE, RATE, "wav")
    assert stream[4:8] == b"\xff\xff\xff\xff" and stream[36:44] == b"data\xff\xff\xff\xff"
    assert int.from_bytes(whole[40:44], "little") == 2 * len(TONE)


def test_a_finished_encoder_refuses_more() -> None:
    encoder = ProgressiveEncoder("mp3", RATE, RATE)
    encoder.feed(TONE[:1000])
    assert encoder.finish() and encoder.finish() == b""
    with pytest.raises(RuntimeError):
        encoder.feed(TONE)


def test_every_request_format_has_an_encoder_and_a_content_type() -> None:
    assert set(CONTENT_TYPES) == set(AUDIO_FORMATS)
    for audio_format in AUDIO_FORMATS:
        assert encode(np.zeros(2400, dtype=np.float32), 24_000, audio_format)
