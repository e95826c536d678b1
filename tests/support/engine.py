"""Probes on the real engine: a spy on its audio encoder, and requests that join a running
batch at chosen steps."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from higgs_runpod.synthesis.engine import Engine


class EncodeSpy:
    """Counts the audio tokenizer's encodes, delegating to the engine's real encoder."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = engine.encode_clip

        def spy(samples: np.ndarray) -> torch.Tensor:
            self.calls += 1
            return real(samples)

        monkeypatch.setattr(engine, "encode_clip", spy)


class Staggered:
    """Requests started one after another, each once the frames produced so far (by any
    of them) reach its mark, so that every row joins the batch at another step."""

    def __init__(self) -> None:
        self.frames, self.lock = 0, threading.Lock()
        self.marks: list[tuple[int, threading.Event]] = []
        self.threads: list[threading.Thread] = []
        self.results: dict[str, object] = {}

    def count(self, frames: torch.Tensor) -> None:
        """An `on_frames` callback: adds the frames and releases every request now due."""
        with self.lock:
            self.frames += frames.shape[0]
            for mark, event in self.marks:
                if self.frames >= mark:
                    event.set()

    def start(self, name: str, at: int, run: Callable[[], object]) -> None:
        event = threading.Event()
        self.marks.append((at, event))
        if at <= 0:
            event.set()

        def target() -> None:
            event.wait(timeout=60)
            try:
                self.results[name] = run()
            except Exception as error:
                self.results[name] = error

        self.threads.append(threading.Thread(target=target))
        self.threads[-1].start()

    def join(self) -> dict[str, object]:
        """name -> what its run returned, or the exception it raised."""
        for thread in self.threads:
            thread.join(timeout=120)
        return self.results
