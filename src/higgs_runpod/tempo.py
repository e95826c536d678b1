"""Change the speed of speech without changing its pitch (OpenAI's `speed`).

FFmpeg's `atempo` filter (WSOLA time stretching) through PyAV, already the worker's audio
library. One `atempo` accepts factors from 0.5 to 100, so slower factors are a chain of
0.5 steps plus the remainder.
"""

from __future__ import annotations

import av
import av.filter
import numpy as np

MIN_SPEED = 0.25
MAX_SPEED = 4.0
_ATEMPO_MIN = 0.5


def atempo_factors(speed: float) -> list[float]:
    """Factors whose product is `speed`, each within what one atempo filter accepts."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}, not {speed}")
    factors = []
    while speed < _ATEMPO_MIN:
        factors.append(_ATEMPO_MIN)
        speed /= _ATEMPO_MIN
    return [*factors, speed]


def time_stretch(samples: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """float32 mono samples played `speed` times faster, at the same pitch."""
    if speed == 1.0 or len(samples) == 0:
        return samples
    graph = av.filter.Graph()
    node = graph.add_abuffer(
        format="flt", sample_rate=sample_rate, layout="mono", time_base=f"1/{sample_rate}"
    )
    for factor in atempo_factors(speed):
        stretched = graph.add("atempo", f"{factor:.6f}")
        node.link_to(stretched)
        node = stretched
    sink = graph.add("abuffersink")
    node.link_to(sink)
    graph.configure()

    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1), format="flt", layout="mono"
    )
    frame.sample_rate = sample_rate
    frame.pts = 0
    graph.push(frame)
    graph.push(None)
    pieces: list[np.ndarray] = []
    while True:
        try:
            out = graph.pull()
        except (av.BlockingIOError, av.EOFError):
            break
        pieces.append(out.to_ndarray().reshape(-1))
    return np.concatenate(pieces).astype(np.float32, copy=False) if pieces else samples[:0]
