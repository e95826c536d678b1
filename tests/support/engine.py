"""Probes on the real engine: a spy on its audio encoder, requests that join a running
batch at chosen steps, and requests admitted in the same turn."""

from __future__ import annotations

import threading
import time
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


def admitted_together(engine: Engine, calls: list[Callable[[], object]]) -> list[object]:
    """Run `calls` (each submits one request) while the decode loop is held, so that every
    request is waiting when it resumes and all are admitted in one turn; returns what each
    returned, or the exception it raised."""
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: engine.call(lambda: (held.set(), release.wait(60))))
    holder.start()
    assert held.wait(60)
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while engine.waiting < len(calls) and time.monotonic() < deadline:
        time.sleep(0.005)
    release.set()
    for thread in [holder, *threads]:
        thread.join(timeout=120)
    return results


class ForwardSpy:
    """The batch size of every call of the model's forward (only prefill calls it)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[int] = []
        assert engine.model is not None
        real = engine.model.forward

        def spy(*args: object, **kwargs: torch.Tensor) -> object:
            self.batches.append(int(kwargs["input_ids"].shape[0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(engine.model, "forward", spy)
