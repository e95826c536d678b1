"""Micro-batching: synthesis calls that arrive close together share one `generate`.

Each caller (a worker thread serving one job) submits a `Job` and blocks on its own
future; one generation thread takes the first waiting job, waits up to BATCH_WINDOW_MS for
more (up to MAX_BATCH_SIZE), and runs those that can share a batch together:

- the same sampling settings (one generation config serves the whole batch);
- all with reference audio in the prompt, or all without (the model's batch rule);
- a request with an explicit seed runs alone, so that the seed reproduces it exactly.

The rest wait for the next round, first come first served. Every job gets its own result
or its own error, never another's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .engine import Job, Synthesis

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Job]], list[Synthesis | Exception]]


def batch_key(job: Job) -> tuple[Any, ...]:
    """Jobs with equal keys may share a batch; a seeded job's key is unique to it."""
    has_audio = any(
        item["type"] == "audio" for message in job.conversation for item in message["content"]
    )
    settings = dataclasses.replace(job.params, seed=None)
    return (settings, has_audio, id(job) if job.params.seed is not None else None)


class Batcher:
    """Collects jobs from many threads and runs compatible ones together on one thread."""

    def __init__(self, run_batch: RunBatch, window_ms: float, max_batch_size: int) -> None:
        self.run_batch = run_batch
        self.window_s = window_ms / 1000.0
        self.max_batch_size = max_batch_size
        self._waiting: list[tuple[Job, Future[Synthesis]]] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Synthesis:
        """Run `job` in the next batch it fits; blocks until its own result is ready."""
        future: Future[Synthesis] = Future()
        with self._changed:
            self._waiting.append((job, future))
            self._changed.notify_all()
        return future.result()

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                results = self.run_batch([job for job, _ in batch])
            except Exception as error:  # the engine returns errors per job; this is a bug
                log.exception("batch of %d failed", len(batch))
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _next_batch(self) -> list[tuple[Job, Future[Synthesis]]]:
        """Wait for a job, then up to the window for others that fit with it."""
        with self._changed:
            while not self._waiting:
                self._changed.wait()
            first_key = batch_key(self._waiting[0][0])
            deadline = time.monotonic() + self.window_s
            while True:
                fitting = [item for item in self._waiting if batch_key(item[0]) == first_key]
                left = deadline - time.monotonic()
                if len(fitting) >= self.max_batch_size or left <= 0:
                    break
                self._changed.wait(left)
            batch = fitting[: self.max_batch_size]
            taken = {id(item) for item in batch}
            self._waiting = [item for item in self._waiting if id(item) not in taken]
        if len(batch) > 1:
            log.debug("batch of %d", len(batch))
        return batch
