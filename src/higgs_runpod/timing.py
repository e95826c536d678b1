"""The one clock the worker reports durations from (`timings_ms`, log lines, metrics)."""

from __future__ import annotations

import time


def ms_since(start: float) -> float:
    """Milliseconds since `start`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - start) * 1000.0
