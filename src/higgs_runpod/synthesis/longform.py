"""Generating a text chunk by chunk, each chunk hearing the ones before it.

Every chunk is generated with the same voice and the same seed (the request's, or one
drawn here for a long text; the engine draws one for a single chunk). The prompt of chunk k
also holds the text and the audio codes of the `context_chunks` chunks before it (the
codes themselves: nothing is decoded and encoded again), so the voice and the pace carry
on; as many of them as leave room for `max_new_tokens` in the context window, the oldest
dropped first. The chunks' codes are joined and decoded in one pass, so the joins have no clicks.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from higgs_runpod.errors import GenerationCancelled
from higgs_runpod.request.chunking import Chunk
from higgs_runpod.synthesis.engine import Engine, FrameCallback, SamplingParams, Synthesis
from higgs_runpod.timing import ms_since

Conversation = list[dict[str, Any]]
MakeConversation = Callable[[str, Sequence[tuple[str, torch.Tensor]]], Conversation]


@dataclass(frozen=True)
class ChunkReport:
    index: int
    start: int  # character span in the request's text
    end: int
    frames: int
    generate_ms: float


@dataclass(frozen=True)
class LongSynthesis:
    codes: torch.Tensor  # (frames, codebooks) of all chunks, in order
    chunks: list[ChunkReport]
    seed: int
    prompt_tokens: int
    generated_tokens: int
    prepare_ms: float
    generate_ms: float

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])


def synthesize_chunks(
    engine: Engine,
    chunks: Sequence[Chunk],
    make_conversation: MakeConversation,
    params: SamplingParams,
    context_chunks: int,
    *,
    cancel: threading.Event | None = None,
    on_frames: FrameCallback | None = None,
    on_chunk: Callable[[int], None] | None = None,
    history: Sequence[tuple[str, torch.Tensor]] = (),
) -> LongSynthesis:
    """Generate `chunks` in order; raises `GenerationCancelled` if `cancel` is set meanwhile.

    `history` holds (text, codes) said before the first chunk, as context (a WebSocket
    session's earlier segments).
    """
    if params.seed is None and len(chunks) > 1:  # one seed for every chunk of a long text
        params = replace(params, seed=random.randrange(2**32))
    history = list(history)
    made = _Made()
    for index, chunk in enumerate(chunks):
        if on_chunk is not None:
            on_chunk(index)
        context = history[-context_chunks:] if context_chunks else []
        context = _fitting(engine, make_conversation, chunk.text, context, params.max_new_tokens)
        started = time.perf_counter()
        result = engine.synthesize(
            make_conversation(chunk.text, context),
            params,
            cancel=cancel,
            on_frames=on_frames,
        )
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(
                f"cancelled after {result.generated_tokens} decode steps "
                f"of chunk {index + 1} of {len(chunks)}"
            )
        history.append((chunk.text, result.codes))
        made.add(index, chunk, result, ms_since(started))
    return made.synthesis(params.seed)


class _Made:
    """The chunks generated so far, summed into one LongSynthesis at the end."""

    def __init__(self) -> None:
        self.first_seed = 0
        self.reports: list[ChunkReport] = []
        self.codes: list[torch.Tensor] = []
        self.totals = {"prompt": 0, "generated": 0, "prepare": 0.0, "generate": 0.0}

    def add(self, index: int, chunk: Chunk, result: Synthesis, generate_ms: float) -> None:
        if index == 0:
            self.first_seed = result.seed
        self.codes.append(result.codes)
        self.reports.append(ChunkReport(index=index, start=chunk.start, end=chunk.end,
                                        frames=result.frames, generate_ms=generate_ms))  # fmt: skip
        self.totals["prompt"] += result.prompt_tokens
        self.totals["generated"] += result.generated_tokens
        self.totals["prepare"] += result.prepare_ms
        self.totals["generate"] += result.generate_ms

    def synthesis(self, seed: int | None) -> LongSynthesis:
        """All chunks as one; `seed` is the request's, else the first chunk's (its own)."""
        return LongSynthesis(
            codes=torch.cat(self.codes),
            chunks=self.reports,
            seed=seed if seed is not None else self.first_seed,
            prompt_tokens=int(self.totals["prompt"]),
            generated_tokens=int(self.totals["generated"]),
            prepare_ms=self.totals["prepare"],
            generate_ms=self.totals["generate"],
        )


def _fitting(
    engine: Engine,
    make_conversation: MakeConversation,
    text: str,
    context: list[tuple[str, torch.Tensor]],
    max_new_tokens: int,
) -> list[tuple[str, torch.Tensor]]:
    """The latest of `context` whose prompt leaves room for `max_new_tokens` in a request's
    context window (MAX_CONTEXT_TOKENS): older chunks are dropped, not the chunk failed."""
    while context:
        inputs = engine.prompt_inputs(make_conversation(text, context))
        if int(inputs["input_ids"].shape[-1]) + max_new_tokens <= engine.context:
            break
        context = context[1:]
    return context
