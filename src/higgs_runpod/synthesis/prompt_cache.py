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
BATCH_TOKENS = 8192  # positions (rows x padded length) in one batched prefill forward


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
        self, model: HiggsAudioV2ForConditionalGeneration, prompts: list[BatchFeature]
    ) -> list[PromptForward]:
        """Prefill each of `prompts` (one prompt each, as prompts.render_prompt makes them)
        through the model's own forward, reusing the longest cached beginnings.

        Prompts whose rest is all text run in one batched forward (right-padded, on top of
        their beginnings cut to a common length): requests that arrive together cost
        about one forward, not one each. A prompt with audio in its rest runs alone.
        """
        keys = [prompt_key(model.config, inputs) for inputs in prompts]
        matches = [self._longest(key) for key in keys]
        alone, together = _batchable(keys, matches)
        forwards: dict[int, PromptForward] = {}
        for index in alone:
            forwards[index] = self._forward_one(model, prompts[index], *matches[index])
        for group, past in together:
            rows = [(prompts[i], matches[i][0]) for i in group]
            forwards.update(zip(group, _forward_batch(model, rows, past), strict=True))
            self.reused_tokens += past * len(group)
        for index, key in enumerate(keys):
            self._add(key, forwards[index].cache)
        return [forwards[index] for index in range(len(prompts))]

    def _forward_one(
        self, model: HiggsAudioV2ForConditionalGeneration, inputs: BatchFeature,
        entry: _Entry | None, shared: int,
    ) -> PromptForward:  # fmt: skip
        cache = DynamicCache(config=model.config)
        if entry is None:
            output = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        else:
            for layer, (keys, values) in enumerate(zip(entry.keys, entry.values, strict=True)):
                cache.update(keys[None, :, :shared], values[None, :, :shared], layer)
            suffix = _suffix(model.config, inputs, shared)
            output = model(**suffix, cache=cache, use_cache=True, logits_to_keep=1)
            self.reused_tokens += shared
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


Match = tuple[_Entry | None, int]


def _batchable(
    keys: list[torch.Tensor], matches: list[Match]
) -> tuple[list[int], list[tuple[list[int], int]]]:
    """Which prompts run alone, and which run together in groups, each on a common number
    of cached tokens. Prompts with a cached beginning share the shortest one among them;
    a prompt still holding audio after that common length runs alone (its audio frames
    would need the batch to carry audio inputs), as does any prompt in a group of one."""
    audio_ends = [_audio_end(key) for key in keys]
    alone = [i for i, (entry, _) in enumerate(matches) if entry is None and audio_ends[i]]
    cold = [i for i, (entry, _) in enumerate(matches) if entry is None and not audio_ends[i]]
    warm = [i for i, (entry, _) in enumerate(matches) if entry is not None]
    warm_past = 0
    while warm:
        warm_past = min(matches[i][1] for i in warm)
        late = [i for i in warm if audio_ends[i] > warm_past]
        if not late:
            break
        alone += late
        warm = [i for i in warm if i not in late]
    groups = []
    for members, past in ((cold, 0), (warm, warm_past)):
        for group in _split(members, [len(keys[i]) - past for i in members]):
            if len(group) == 1:
                alone += group
            else:
                groups.append((group, past))
    return sorted(alone), groups


def _split(members: list[int], lengths: list[int]) -> list[list[int]]:
    """Consecutive groups whose padded size (rows x longest) stays within BATCH_TOKENS."""
    groups: list[list[int]] = []
    longest = 0
    for member, length in zip(members, lengths, strict=True):
        if groups and (len(groups[-1]) + 1) * max(longest, length) <= BATCH_TOKENS:
            groups[-1].append(member)
            longest = max(longest, length)
        else:
            groups.append([member])
            longest = length
    return groups


def _audio_end(key: torch.Tensor) -> int:
    """One past the last audio position of a prompt key (0: no audio)."""
    audio = (key[:, 1:] >= 0).any(dim=1).nonzero()
    return int(audio[-1]) + 1 if audio.numel() else 0


def _forward_batch(
    model: HiggsAudioV2ForConditionalGeneration,
    rows: list[tuple[BatchFeature, _Entry | None]],
    past: int,
) -> list[PromptForward]:
    """Text-only rests of several prompts in one forward: each row on its own cached
    first `past` tokens, its rest right-padded (the padding masked and never attended to
    by real tokens, which come first); each row's logits are taken at its last token and
    its keys and values cut to its length."""
    ids = [inputs["input_ids"][0, past:] for inputs, _ in rows]
    lengths = [int(rest.shape[0]) for rest in ids]
    width = max(lengths)
    device = ids[0].device
    batch = torch.stack([torch.cat([rest, rest[-1:].expand(width - len(rest))]) for rest in ids])
    mask = torch.zeros((len(rows), past + width), dtype=torch.long, device=device)
    for row, length in enumerate(lengths):
        mask[row, : past + length] = 1
    cache = DynamicCache(config=model.config)
    entries = [entry for _, entry in rows if entry is not None]
    if past:
        for layer in range(len(entries[0].keys)):
            keys = torch.stack([entry.keys[layer][:, :past] for entry in entries])
            values = torch.stack([entry.values[layer][:, :past] for entry in entries])
            cache.update(keys, values, layer)
    last = torch.tensor(lengths, device=device)[:, None] - 1
    output = model(input_ids=batch, attention_mask=mask, cache=cache, use_cache=True,
                   logits_to_keep=last)  # fmt: skip
    layers: list[Any] = list(cache.layers)
    forwards = []
    for row, length in enumerate(lengths):
        own = DynamicCache(config=model.config)
        for index, layer in enumerate(layers):  # copies: a view would keep the whole batch
            own.update(layer.keys[row : row + 1, :, : past + length].clone(),
                       layer.values[row : row + 1, :, : past + length].clone(), index)  # fmt: skip
        forwards.append(PromptForward(output.logits[row : row + 1, -1], own))
    return forwards
