"""Continuous batching: one thread runs every request's decode steps together.

Callers (one thread per job) submit a `Request` and block on its future. The loop thread
owns the model and does all model work, in this order, again and again:

1. side tasks (load, encode a reference clip, decode codes to audio), queued by callers;
2. admission: waiting requests get free slots, their prompts are prefilled through the
   model's own forward, together where the prompt cache can batch them (so requests that
   arrive at once cost about one forward), and their first steps sampled; they join the
   batch at the next step (side tasks queued meanwhile run first);
3. one decode step for every running request (slots.decode_step), then a single
   asynchronous copy of its codes and finished flags to the host;
4. the copy of the step before is read: frames go to each request's aligner and
   streaming callback, finished requests leave and their slots are reused at once.

A request leaves when its audio ends, at max_new_tokens, or at the step after its cancel
event is set. A request whose prompt or prefill fails fails alone (a batched prefill that
fails, out of memory or otherwise, is tried again one request at a time); running out of
memory during a step evicts the newest requests with a clear error and the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from higgs_runpod.errors import OUT_OF_MEMORY, OutOfMemoryError
from higgs_runpod.synthesis.sampler import SamplingParams
from higgs_runpod.synthesis.streaming import DelayAligner

log = logging.getLogger(__name__)

FrameCallback = Callable[[torch.Tensor], None]


@dataclass(eq=False)
class Request:
    """One prompt to decode, with where its frames go and what cancels it."""

    prepare: Callable[[], Any]  # -> Prefill; run on the loop thread at admission
    settings: SamplingParams  # its seed resolved
    aligner: DelayAligner
    cancel: threading.Event | None = None
    on_frames: FrameCallback | None = None
    future: Future[Decoded] = field(default_factory=Future)
    frames: list[torch.Tensor] = field(default_factory=list)
    steps: int = 0
    prompt_tokens: int = 0
    prepare_ms: float = 0.0
    started: float = 0.0
    launched: int = 0  # decode steps launched for it (its position is prompt + launched)
    slot: int = -1
    finished: bool = False

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def take(self, step: torch.Tensor) -> None:
        """One generated step (codebooks,) on the host."""
        self.steps += 1
        new = self.aligner.push(step)
        if new.shape[0]:
            self.frames.append(new)
            if self.on_frames is not None:
                self.on_frames(new)


@dataclass(frozen=True)
class Decoded:
    """What a request decoded: its complete frames and what it cost."""

    frames: list[torch.Tensor]
    steps: int
    prompt_tokens: int
    prepare_ms: float
    generate_ms: float


class Backend(Protocol):
    """What the loop needs from the engine (see engine.Engine)."""

    slots: int
    context: int

    def prefill(self, admitted: list[tuple[Request, int]]) -> list[torch.Tensor | Exception]:
        """Prefill each request into its slot; return each one's first step with the
        finished flag, or the error its prompt failed with."""
        ...

    def step(self, rows: int, length: int, settings: list[SamplingParams]) -> torch.Tensor:
        """Launch a decode step for rows [0, rows) whose busy rows have these settings;
        return the device tensor holding its readback."""
        ...

    def deactivate(self, slot: int) -> None: ...

    def activate(self, slot: int) -> None: ...

    def release_memory(self) -> None: ...


class DecodeLoop:
    """The thread that owns the model; see the module docstring for what it does."""

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._waiting: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._slots: list[Request | None] = []
        self._pending: tuple[torch.Tensor, Any, list[Request | None]] | None = None
        self._buffers: list[torch.Tensor] = []
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def attach(self, backend: Backend) -> None:
        """Start decoding on `backend` (called on the loop thread once the model is loaded)."""
        self.backend = backend
        self._slots = [None] * backend.slots

    def call(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the loop thread between steps and return its result."""
        if self.on_loop_thread:
            return function()
        future: Future[Any] = Future()
        self._tasks.put((function, future))
        self._wake.set()
        return future.result()

    def submit(self, request: Request) -> Decoded:
        """Decode `request` among the others; blocks until it has finished."""
        with self._lock:
            self._waiting.append(request)
        self._wake.set()
        return request.future.result()

    @property
    def running(self) -> int:
        return sum(request is not None for request in self._slots)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted."""
        with self._lock:
            return len(self._waiting)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    self._turn()
                except Exception as error:  # a bug: fail what is running, keep serving
                    log.exception("decode loop error")
                    self._pending = None
                    for request in self._slots:
                        if request is not None:
                            self._fail(request, error)

    def _turn(self) -> None:
        self._run_tasks()
        if self.backend is None:
            self._sleep()
            return
        if self._admit():
            self._run_tasks()  # those queued during the prefill: prompt checks, audio pieces
        self._drop_cancelled()
        if self.running:
            self._step()
        elif self._pending is not None:
            self._read(*self._pending)
            self._pending = None
        else:
            self._sleep()

    def _sleep(self) -> None:
        self._wake.wait()
        self._wake.clear()

    def _run_tasks(self) -> None:
        while True:
            try:
                function, future = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(function())
            except BaseException as error:
                future.set_exception(error)

    def _admit(self) -> bool:
        """Waiting requests into free slots, prefilled together; False if there were none."""
        free = [slot for slot, request in enumerate(self._slots) if request is None]
        with self._lock:
            self._waiting = [r for r in self._waiting if not self._leave_if_cancelled(r)]
            admitted, self._waiting = self._waiting[: len(free)], self._waiting[len(free) :]
        if admitted:
            self._start(list(zip(admitted, free, strict=False)))
        return bool(admitted)

    def _start(self, admitted: list[tuple[Request, int]]) -> None:
        assert self.backend is not None
        for request, _ in admitted:
            request.started = time.perf_counter()
        try:
            outcomes: list[torch.Tensor | Exception] = self.backend.prefill(admitted)
        except Exception as error:  # out of memory, or one prompt the forward refused
            out_of_memory = isinstance(error, torch.OutOfMemoryError)
            if out_of_memory:
                self.backend.release_memory()
            if len(admitted) > 1:  # one at a time, so that only what failed fails
                for one in admitted:
                    self._start([one])
                return
            outcomes = [OutOfMemoryError(OUT_OF_MEMORY) if out_of_memory else error]
        for (request, slot), outcome in zip(admitted, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._fail(request, outcome)
            else:
                self._join(request, slot, outcome.cpu())

    def _join(self, request: Request, slot: int, first: torch.Tensor) -> None:
        """A prefilled request into the batch, with its first step taken."""
        assert self.backend is not None
        request.slot = slot
        self._slots[slot] = request
        try:
            request.take(first[:-1])
        except Exception as error:
            self._fail(request, error)
            return
        if first[-1]:
            self._finish(request)
        else:
            self.backend.activate(slot)

    def _drop_cancelled(self) -> None:
        for request in self._slots:
            if request is not None and request.cancelled:
                self._finish(request)

    def _leave_if_cancelled(self, request: Request) -> bool:
        if request.cancelled:
            request.finished = True
            request.future.set_result(_decoded(request))
        return request.cancelled

    def _step(self) -> None:
        assert self.backend is not None
        busy = [r for r in self._slots if r is not None]
        rows = max(r.slot for r in busy) + 1
        length = min(max(r.prompt_tokens + r.launched for r in busy) + 1, self.backend.context)
        try:
            readback = self.backend.step(rows, length, [r.settings for r in busy])
        except torch.OutOfMemoryError:
            self._evict_newest(busy)
            return
        for request in busy:
            request.launched += 1
        copy = self._host_buffer(readback)
        copy.copy_(readback, non_blocking=True)
        event = torch.cuda.Event() if readback.is_cuda else None
        if event is not None:
            event.record()
        if self._pending is not None:  # read the step before while this one runs
            self._read(*self._pending)
        self._pending = (copy, event, list(self._slots[:rows]))

    def _host_buffer(self, readback: torch.Tensor) -> torch.Tensor:
        """One of two host buffers, in turn: the step before's copy is still being read."""
        if not self._buffers:
            shape = (len(self._slots), readback.shape[1])
            pinned = readback.is_cuda
            self._buffers = [torch.empty(shape, dtype=readback.dtype, pin_memory=pinned)
                             for _ in range(2)]  # fmt: skip
        self._buffers.reverse()
        return self._buffers[0][: readback.shape[0]]

    def _read(self, copy: torch.Tensor, event: Any, occupants: list[Request | None]) -> None:
        if event is not None:
            event.synchronize()
        for slot, request in enumerate(occupants):
            if request is None or request.finished:
                continue
            try:
                request.take(copy[slot, :-1].clone())  # the buffer is reused
            except Exception as error:  # its streaming callback failed: it alone stops
                self._fail(request, error)
                continue
            if copy[slot, -1]:
                self._finish(request)

    def _evict_newest(self, busy: list[Request]) -> None:
        assert self.backend is not None
        newest = max(busy, key=lambda r: r.started)
        log.warning("out of memory in a decode step of %d requests: evicting the newest", len(busy))
        self.backend.release_memory()
        self._fail(newest, OutOfMemoryError(_OUT_OF_MEMORY_DECODE))

    def _finish(self, request: Request) -> None:
        self._leave(request)
        request.future.set_result(_decoded(request))

    def _fail(self, request: Request, error: BaseException) -> None:
        self._leave(request)
        request.future.set_exception(error)

    def _leave(self, request: Request) -> None:
        request.finished = True
        if request.slot >= 0 and self._slots[request.slot] is request:
            assert self.backend is not None
            self.backend.deactivate(request.slot)
            self._slots[request.slot] = None


def _decoded(request: Request) -> Decoded:
    generate_ms = (time.perf_counter() - request.started) * 1000.0 if request.started else 0.0
    return Decoded(request.frames, request.steps, request.prompt_tokens, request.prepare_ms,
                   generate_ms)  # fmt: skip


_OUT_OF_MEMORY_DECODE = (
    "the GPU ran out of memory while this request was decoding with others, and it was the "
    "newest, so it was stopped; try again or lower MAX_BATCH_SIZE"
)
