"""The decode batch on the device: one KV-cache slot per running request, one step for all.

Everything a decode step touches is preallocated with static shapes when the model loads:
keys and values (layers x slots x kv_heads x context x head_dim), each slot's last codes,
position and active flag, its sampling state (sampler.SamplingRows) and a readback row.
A step runs rows [0, rows) over keys [0, length): `rows` covers the highest busy slot and
`length` the longest busy context, so one step reads only what is in use; idle rows in
that range compute and are ignored.

During decode every token is an audio token, so a step goes through the model's own
submodules on their mask-free audio path: audio embeddings, each decoder layer with
`audio_token_mask=None` (audio norms, attention, audio MLP), the final norm and the audio
head. The text MLP and the text head are never read. The step has no host sync, so on
CUDA it is captured as one graph per (rows bucket, length bucket) and replayed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import HiggsAudioV2ForConditionalGeneration

from higgs_runpod.synthesis.sampler import ALL_FEATURES, AudioVocab, Features, SamplingRows, sample

log = logging.getLogger(__name__)


class SlotCache:
    """Preallocated keys and values; during a step the attention modules see `StepView`."""

    def __init__(self, config: Any, slots: int, context: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        layers, heads, head_dim = _kv_shape(config)
        shape = (slots, heads, context, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.context = context

    @staticmethod
    def bytes_per_token(config: Any, dtype: torch.dtype) -> int:
        layers, heads, head_dim = _kv_shape(config)
        return 2 * layers * heads * head_dim * torch.finfo(dtype).bits // 8

    def fill(self, slot: int, prefill_cache: object) -> None:
        """Copy a prefill's keys and values (a transformers DynamicCache) into `slot`."""
        for layer, source in enumerate(prefill_cache.layers):  # type: ignore[attr-defined]
            length = source.keys.shape[2]
            self.keys[layer][slot, :, :length] = source.keys[0]
            self.values[layer][slot, :, :length] = source.values[0]


def _kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a model config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, config.num_key_value_heads, head_dim


class StepView:
    """What attention's `cache.update` sees during one step: each row writes its new key
    and value at its own position and attends over the first `length` positions."""

    def __init__(self, cache: SlotCache, rows: torch.Tensor, positions: torch.Tensor,
                 length: int) -> None:  # fmt: skip
        self.cache, self.length, self.count = cache, length, rows.shape[0]
        heads, context = cache.keys[0].shape[1], cache.context
        # One flat index per (row, head) into (slots * heads * context): index_copy_ along
        # one dimension is the cheapest scatter there is.
        head_index = torch.arange(heads, device=rows.device)
        self.index = ((rows[:, None] * heads + head_index) * context + positions[:, None]).view(-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        width = keys.shape[-1]
        keys.view(-1, width).index_copy_(0, self.index, key_states.reshape(-1, width))
        values.view(-1, width).index_copy_(0, self.index, value_states.reshape(-1, width))
        return keys[: self.count, :, : self.length], values[: self.count, :, : self.length]


@dataclass
class DecodeState:
    """Per-slot inputs and outputs of a step."""

    codes: torch.Tensor  # (slots, codebooks): the last step, fed to the next one
    positions: torch.Tensor  # (slots,): where that step goes in the cache
    active: torch.Tensor  # (slots,) bool
    readback: torch.Tensor  # (slots, codebooks + 1): new codes and the finished flag
    sampling: SamplingRows
    row_index: torch.Tensor  # arange(slots)

    @classmethod
    def allocate(cls, slots: int, vocab: AudioVocab, device: torch.device) -> DecodeState:
        codebooks = vocab.num_codebooks
        return cls(
            codes=torch.zeros((slots, codebooks), dtype=torch.long, device=device),
            positions=torch.zeros(slots, dtype=torch.long, device=device),
            active=torch.zeros(slots, dtype=torch.bool, device=device),
            readback=torch.zeros((slots, codebooks + 1), dtype=torch.long, device=device),
            sampling=SamplingRows.allocate(slots, vocab, device),
            row_index=torch.arange(slots, device=device),
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.positions, self.active, self.readback, *self.sampling.tensors()]


def decode_step(
    model: HiggsAudioV2ForConditionalGeneration,
    cache: SlotCache,
    state: DecodeState,
    vocab: AudioVocab,
    rows: int,
    length: int,
    features: Features = ALL_FEATURES,
) -> None:
    """One audio step for rows [0, rows), attending over [0, length); results land in
    `state` (codes, positions, active, readback) and in the cache."""
    inner = model.model
    codes, positions, active = state.codes[:rows], state.positions[:rows], state.active[:rows]
    hidden = inner.embed_audio_tokens(codes[:, None, :])
    embeddings = inner.rotary_emb(hidden, positions[:, None])
    beyond = torch.arange(length, device=hidden.device)[None, :] > positions[:, None]
    mask = (beyond.to(hidden.dtype) * torch.finfo(hidden.dtype).min)[:, None, None, :]
    view = StepView(cache, state.row_index[:rows], positions, length)
    for layer in inner.layers[: inner.config.num_hidden_layers]:
        hidden = layer(hidden, embeddings, attention_mask=mask, audio_token_mask=None, cache=view)
    logits = model.audio_lm_head(inner.norm(hidden)[:, 0])
    out = sample(state.sampling.rows(0, rows), logits, vocab, features)
    state.readback[:rows].copy_(out)
    codes.copy_(torch.where(active[:, None], out[:, :-1], codes))
    positions.add_(active.long())
    active.logical_and_(out[:, -1] == 0)


def buckets(limit: int, first: int) -> list[int]:
    """first, 2 * first, 4 * first, ... up to and including `limit`."""
    sizes = [first]
    while sizes[-1] < limit:
        sizes.append(min(sizes[-1] * 2, limit))
    return sizes


def bucket_for(value: int, sizes: list[int]) -> int:
    return next(size for size in sizes if size >= value)


Step = Callable[..., None]


class GraphedSteps:
    """The decode step captured as CUDA graphs, one per (rows bucket, length bucket).

    `capture` checks each graph once against the eager step on the same state and raises
    if anything differs, so that a broken capture falls back to eager instead of decoding
    wrong codes.
    """

    def __init__(self, eager: Step, state: DecodeState, slots: int, context: int) -> None:
        self.eager = eager
        self.state = state
        self.row_buckets = buckets(slots, 1)
        self.length_buckets = buckets(context, min(256, context))
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def capture(self) -> None:
        saved = [tensor.clone() for tensor in self.state.tensors()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: kernels chosen and workspaces allocated
                self.eager(self.row_buckets[-1], self.length_buckets[-1])
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for rows in reversed(self.row_buckets):
            for length in reversed(self.length_buckets):
                self._restore(saved)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.eager(rows, length)
                self.graphs[(rows, length)] = graph
        self._check(saved)
        self._restore(saved)

    def _check(self, saved: list[torch.Tensor]) -> None:
        rows, length = self.row_buckets[-1], self.length_buckets[0]
        self._restore(saved)
        self.eager(rows, length)
        expected = self.state.readback.clone()
        self._restore(saved)
        self.graphs[(rows, length)].replay()
        if not torch.equal(self.state.readback, expected):
            raise RuntimeError("a captured decode step differs from the eager step")

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for tensor, copy in zip(self.state.tensors(), saved, strict=True):
            tensor.copy_(copy)

    def __call__(self, rows: int, length: int) -> None:
        key = (bucket_for(rows, self.row_buckets), bucket_for(length, self.length_buckets))
        self.graphs[key].replay()
