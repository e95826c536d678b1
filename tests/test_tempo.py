"""Speed changes through FFmpeg's atempo: the duration scales, the pitch stays."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_runpod.synthesis.progressive import ProgressiveEncoder
from higgs_runpod.synthesis.tempo import Stretcher, atempo_factors

RATE = 24_000


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def time_stretch(samples: np.ndarray, rate: int, speed: float) -> np.ndarray:
    """What an encoder does to a clip at `speed`: push it all through a Stretcher."""
    stretcher = Stretcher(rate, speed)
    return np.concatenate([stretcher.push(samples), stretcher.flush()])


def dominant_hz(samples: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(samples))) * RATE / len(samples))


@pytest.mark.parametrize("speed", [0.25, 0.4, 0.5, 0.8, 1.5, 2.0, 4.0])
def test_duration_scales_and_pitch_stays(speed: float) -> None:
    stretched = time_stretch(tone(2.0), RATE, speed)
    assert stretched.dtype == np.float32
    assert len(stretched) / RATE == pytest.approx(2.0 / speed, rel=0.03)
    assert dominant_hz(stretched) == pytest.approx(440.0, abs=3.0)


def test_speed_one_leaves_the_samples_untouched() -> None:
    """At speed 1 an encoder has no stretcher: its samples go straight to the codec."""
    assert ProgressiveEncoder("pcm", RATE, RATE, 1.0).stretcher is None
    assert ProgressiveEncoder("pcm", RATE, RATE, 1.5).stretcher is not None


def test_factors_below_one_half_are_chained() -> None:
    assert atempo_factors(0.25) == [0.5, 0.5]
    assert np.prod(atempo_factors(0.3)) == pytest.approx(0.3)
    assert all(0.5 <= factor <= 100 for factor in atempo_factors(0.3))


@pytest.mark.parametrize("speed", [0.2, 4.5])
def test_out_of_range_speed_is_refused(speed: float) -> None:
    with pytest.raises(ValueError, match=r"between 0\.25 and 4\.0"):
        atempo_factors(speed)
