"""Keys and values of recent prompts, so a prompt that begins as one of them prefills only
the rest.

Prompts share long beginnings: every request starts with the same system prompt, every
clone of a voice with the same reference clip, and each chunk of a long text with the
chunk before it. Prefill is compute-bound (on a CPU always, on a GPU for long clips), so
the shared part is most of its work. The cache keeps whole prompts' keys and values, finds
the one sharing the longest beginning with a new prompt, and runs the model's forward
only over the tokens after it, on top of those keys and values: what `generate` would do
after the same tokens, one forward call later.

A position matches when its token matches and, at an audio position, its codes do too. The
cache holds at most `max_tokens` tokens; the entries used longest ago go first, and an
entry that a newer prompt starts with is dropped as superseded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature, DynamicCache, HiggsAudioV2ForConditionalGeneration

MIN_SHARED_TOKENS = 8  # below this, copying keys and values saves less than it costs


@dataclass(eq=False)  # entries are compared by identity
class _Entry:
    key: torch.Tensor  # (tokens, 1 + codebooks) on the CPU: token id, then codes or -1
    keys: list[torch.Tensor]  # per layer: (kv_heads, tokens, head_dim), on the device
    values: list[torch.Tensor]


@dataclass(frozen=True)
class PromptForward:
    """A prompt's forward: the logits of its last token and its whole keys and values."""

    logits: torch.Tensor  # (1, vocabulary)
    cache: DynamicCache


class PromptCache:
    """The prompts prefilled lately, newest last; used only on the model thread."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: list[_Entry] = []
        self.tokens = 0  # held now
        self.reused_tokens = 0  # taken from the cache instead of prefilled, over its life

    def forward(
        self, model: HiggsAudioV2ForConditionalGeneration, inputs: BatchFeature
    ) -> PromptForward:
        """Prefill `inputs` (one prompt, as prompts.render_prompt makes it) through the
        model's own forward, reusing the longest cached beginning."""
        key = prompt_key(model.config, inputs)
        entry, shared = self._longest(key)
        cache = DynamicCache(config=model.config)
        if entry is None:
            output = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            for layer, (keys, values) in enumerate(zip(entry.keys, entry.values, strict=True)):
                cache.update(keys[None, :, :shared], values[None, :, :shared], layer)
            suffix = _suffix(model.config, inputs, shared)
            output = model(**suffix, cache=cache, use_cache=True, logits_to_keep=1)
            self.reused_tokens += shared
        self._add(key, cache)
        return PromptForward(output.logits[:, -1], cache)

    def _longest(self, key: torch.Tensor) -> tuple[_Entry | None, int]:
        """The entry sharing the longest beginning with `key`, and how many tokens; at least
        the last token is always left to run, since its logits are needed."""
        best, best_length = None, 0
        for entry in self._entries:
            length = _shared_length(entry.key, key[:-1])
            if length > best_length:
                best, best_length = entry, length
        if best is None or best_length < MIN_SHARED_TOKENS:
            return None, 0
        self._entries.remove(best)
        self._entries.append(best)  # used now: it goes last
        return best, best_length

    def _add(self, key: torch.Tensor, cache: DynamicCache) -> None:
        tokens = int(key.shape[0])
        if tokens > self.max_tokens:
            return
        # An entry this prompt starts with (or equals) holds nothing the new one lacks.
        kept = [e for e in self._entries if _shared_length(e.key, key) < len(e.key)]
        held = sum(len(e.key) for e in kept)
        while kept and held + tokens > self.max_tokens:
            held -= len(kept.pop(0).key)
        layers: list[Any] = list(cache.layers)  # DynamicLayer: keys, values (1, heads, T, dim)
        kept.append(
            _Entry(key, [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers])
        )
        self._entries, self.tokens = kept, held + tokens


def prompt_key(config: object, inputs: BatchFeature) -> torch.Tensor:
    """(tokens, 1 + codebooks): each position's token id, then its codes at an audio
    position (-1 elsewhere), so two prompts match where both their text and audio do."""
    ids = inputs["input_ids"][0].cpu()
    audio = inputs.get("audio_input_ids")
    codebooks = int(config.num_codebooks)  # type: ignore[attr-defined]
    key = torch.full((ids.shape[0], 1 + codebooks), -1, dtype=torch.long)
    key[:, 0] = ids
    if audio is not None:
        frames = audio[0][inputs["audio_input_ids_mask"][0]].cpu()
        key[_audio_positions(config, ids), 1:] = frames
    return key


def _audio_positions(config: object, ids: torch.Tensor) -> torch.Tensor:
    """Where the model puts audio embeddings (its own get_placeholder_mask)."""
    audio_token, delay_token = config.audio_token_id, config.audio_delay_token_id  # type: ignore[attr-defined]
    return (ids == audio_token) | (ids == delay_token)


def _shared_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading rows `a` and `b` have in common."""
    length = min(a.shape[0], b.shape[0])
    differs = (a[:length] != b[:length]).any(dim=1).nonzero()
    return int(differs[0]) if differs.numel() else length


def _suffix(config: object, inputs: BatchFeature, shared: int) -> dict[str, torch.Tensor]:
    """The model inputs after the first `shared` tokens: their ids, the audio frames not
    yet in the cache, and the whole attention mask if any (past and new, as generate passes it)."""
    ids = inputs["input_ids"]
    suffix = {"input_ids": ids[:, shared:]}
    if "attention_mask" in inputs:
        suffix["attention_mask"] = inputs["attention_mask"]
    audio = inputs.get("audio_input_ids")
    if audio is not None:
        cached_frames = int(_audio_positions(config, ids[0, :shared]).sum())
        if cached_frames < audio.shape[1]:
            suffix["audio_input_ids"] = audio[:, cached_frames:]
            suffix["audio_input_ids_mask"] = inputs["audio_input_ids_mask"][:, cached_frames:]
    return suffix
