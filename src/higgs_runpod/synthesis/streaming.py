"""From generated steps to audio pieces, as generation goes.

Higgs Audio v2 generates its codebooks in a delay pattern: codebook i lags i steps, so a
frame is complete only when the last codebook has caught up. `DelayAligner` turns steps
into complete frames. `PieceDecoder` turns frames into audio pieces whose concatenation is
the one-shot decode of all frames: the audio tokenizer's decoder is convolutional, so the
samples of a frame depend on a few frames on each side; each piece is decoded with that
many frames of context on both sides and only its own samples are kept. A non-streamed
clip is decoded by the same pieces (`decode_as_streamed`), so the two give equal samples;
the pieces then go to progressive.py's encoder, one per response.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class DelayAligner:
    """Delayed steps (one code per codebook) in, complete frames out.

    The stream opens with an all-BOS step and, when the model finishes, closes with an
    all-EOS step; frame f is complete when step f + codebooks - 1 of the body arrives.
    """

    def __init__(self, bos: int, eos: int) -> None:
        self.bos, self.eos = bos, eos
        self.steps: list[torch.Tensor] = []
        self.emitted = 0
        self.finished = False

    def push(self, step: torch.Tensor) -> torch.Tensor:
        """Take one step (codebooks,); return the frames it completes (n x codebooks)."""
        codebooks = step.shape[-1]
        empty = step.new_zeros((0, codebooks))
        if self.finished:
            return empty
        if bool((step == self.bos).all()):
            self.steps.clear()  # the (last) opening step: the body starts after it
            self.emitted = 0
            return empty
        if bool((step == self.eos).all()):
            self.finished = True
            return empty
        self.steps.append(step)
        frame = len(self.steps) - codebooks
        if frame < self.emitted:
            return empty
        self.emitted = frame + 1
        codes = torch.stack([self.steps[frame + i][i] for i in range(codebooks)])
        return codes.clamp(0, self.bos - 1).unsqueeze(0)


Decode = Callable[[torch.Tensor], np.ndarray]


class PieceDecoder:
    """Frames in, audio pieces out; joined, the pieces equal the one-shot decode."""

    def __init__(self, decode: Decode, context_frames: int, hop: int) -> None:
        self.decode = decode
        self.context = context_frames
        self.hop = hop
        self.frames: list[torch.Tensor] = []
        self.done = 0  # frames whose samples have been returned

    @property
    def pending(self) -> int:
        """Frames received whose samples have not been returned yet."""
        return len(self.frames) - self.done

    def push(self, frames: torch.Tensor) -> None:
        self.frames.extend(frames)

    def ready(self) -> int:
        """Frames that can be returned now: those with full right context."""
        return max(0, len(self.frames) - self.context - self.done)

    def next_size(self, first: int, later: int) -> int:
        """Frames in the next piece: `first` for the first piece, `later` after it.

        The schedule depends on nothing but the frame count, and each piece's window
        (its frames plus up to `context` on each side) too, so a clip decoded here in one
        go after generation gives the very samples its stream gave (see `decode_as_streamed`).
        """
        return first if self.done == 0 else later

    def take(self, count: int | None = None, final: bool = False) -> np.ndarray:
        """Samples of the next `count` frames (all that are ready, or all when `final`)."""
        available = self.pending if final else self.ready()
        count = available if count is None else min(count, available)
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        first = max(0, self.done - self.context)
        last = min(len(self.frames), self.done + count + self.context)
        audio = self.decode(torch.stack(self.frames[first:last]))
        start = (self.done - first) * self.hop
        piece = audio[start : start + count * self.hop]
        self.done += count
        return piece


def decode_as_streamed(
    decode: Decode, context_frames: int, hop: int, codes: torch.Tensor, first: int, later: int
) -> np.ndarray:
    """All of a clip's samples, decoded piece by piece exactly as its stream would be."""
    decoder = PieceDecoder(decode, context_frames, hop)
    decoder.push(codes)
    pieces = [np.zeros(0, dtype=np.float32)]
    while decoder.pending:
        pieces.append(decoder.take(decoder.next_size(first, later), final=True))
    return np.concatenate(pieces)


def receptive_field_frames(decode: Decode, codebooks: int, frames: int = 64) -> int:
    """How many frames on each side one frame's audio depends on, measured once at load.

    Decodes random codes twice, changing only the middle frame, and finds how far the
    change reaches; the checkpoint's decoder, whatever its shape, defines the answer.
    """
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2, (frames, codebooks), generator=generator)
    changed = codes.clone()
    changed[frames // 2] = 1 - changed[frames // 2]
    first, second = decode(codes), decode(changed)
    hop = len(first) // frames
    per_frame = np.abs(first - second).reshape(frames, hop).max(axis=1)
    touched = np.nonzero(per_frame > 0)[0]
    if len(touched) == 0:
        return 0
    reach = int(max(frames // 2 - touched[0], touched[-1] - frames // 2))
    return reach + 1
