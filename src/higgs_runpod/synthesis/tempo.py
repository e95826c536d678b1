"""Change the speed of speech without changing its pitch (OpenAI's `speed`).

FFmpeg's `atempo` filter (WSOLA time stretching) through PyAV, already the worker's audio
library. One `atempo` accepts factors from 0.5 to 100, so slower factors are a chain of
0.5 steps plus the remainder. `Stretcher` keeps one filter graph alive across pieces, so
a stream is stretched as it arrives; its output does not depend on how the input was cut
(fed whole or in pieces, the samples are the same), which is what lets a streamed
response equal the non-streamed one.
"""

from __future__ import annotations

from fractions import Fraction

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


class Stretcher:
    """float32 mono pieces in, the same audio `speed` times faster out, incrementally.

    `push` returns what the filter can give now (atempo holds back up to a window of
    about 60 ms per stage); `flush` returns the rest and ends the stream.
    """

    def __init__(self, sample_rate: int, speed: float) -> None:
        self.sample_rate = sample_rate
        self.graph = av.filter.Graph()
        node = self.graph.add_abuffer(
            format="flt", sample_rate=sample_rate, layout="mono", time_base=Fraction(1, sample_rate)
        )
        for factor in atempo_factors(speed):
            stretched = self.graph.add("atempo", f"{factor:.6f}")
            node.link_to(stretched)
            node = stretched
        sink = self.graph.add("abuffersink")
        node.link_to(sink)
        self.graph.configure()
        self.pts = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        if len(samples) == 0:
            return samples.astype(np.float32, copy=False)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1),
            format="flt",
            layout="mono",
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self.pts
        self.pts += len(samples)
        self.graph.push(frame)
        return self._pull()

    def flush(self) -> np.ndarray:
        self.graph.push(None)
        return self._pull()

    def _pull(self) -> np.ndarray:
        pieces: list[np.ndarray] = []
        while True:
            try:
                out = self.graph.pull()
            except (av.BlockingIOError, av.EOFError):
                break
            pieces.append(out.to_ndarray().reshape(-1))
        return np.concatenate(pieces).astype(np.float32, copy=False) if pieces else _EMPTY


_EMPTY = np.zeros(0, dtype=np.float32)
