"""Prompts that begin as a recent one prefill only the rest, prompts that arrive together
prefill in one forward, and all decode as generate does.

`model.generate` prefills every prompt whole and alone, so it is the reference: a prompt
whose beginning came from the cache, or that ran as a padded row of a batch, must give
generate's codes exactly (greedy, float32).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import BatchFeature

from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.synthesis import prompt_cache
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.synthesis.prompt_cache import PromptCache
from support.engine import ForwardSpy, admitted_together
from test_engine_parity import GREEDY, assert_same, clip, generate_codes

TEXTS = ["Hello there.", "Fine, thanks. And you?", "A third one, a little longer than both.",
         "Four."]  # fmt: skip


@pytest.fixture
def fresh_cache(engine: Engine) -> Iterator[PromptCache]:
    """The session engine with an empty prompt cache; the one it had is put back after,
    whatever cache the test set meanwhile."""
    kept = engine.prompt_cache
    engine.prompt_cache = PromptCache(4096)
    yield engine.prompt_cache
    engine.prompt_cache = kept


def reused_by(engine: Engine, conversation: list[dict]) -> tuple[int, torch.Tensor]:
    """(tokens taken from the cache, codes) of one greedy synthesis."""
    before = engine.prompt_cache.reused_tokens
    codes = engine.synthesize(conversation, GREEDY).codes
    return engine.prompt_cache.reused_tokens - before, codes


def first_audio_position(engine: Engine, conversation: list[dict]) -> int:
    ids = engine.prompt_inputs(conversation)["input_ids"][0]
    audio = (ids == engine.model.config.audio_token_id) | (
        ids == engine.model.config.audio_delay_token_id
    )
    return int(audio.nonzero()[0])


def test_a_second_clone_of_a_voice_reuses_its_clip_and_equals_generate(
    engine: Engine, fresh_cache: PromptCache
) -> None:
    voice = clip(1.2, 330.0)
    first = build_conversation("The quick brown fox.", voice=voice)
    second = build_conversation("Jumps over the lazy dog.", voice=voice)
    reused, _ = reused_by(engine, first)
    assert reused == 0  # nothing was cached yet
    reused, codes = reused_by(engine, second)
    clip_frames = engine.prompt_inputs(second)["audio_input_ids"].shape[1]
    assert reused > first_audio_position(engine, second) + clip_frames  # the clip and all before
    reference, _ = generate_codes(engine, second, GREEDY.max_new_tokens)
    assert torch.equal(codes, reference)


def test_a_different_clip_reuses_only_what_comes_before_it(
    engine: Engine, fresh_cache: PromptCache
) -> None:
    reused_by(engine, build_conversation("The quick brown fox.", voice=clip(1.2, 330.0)))
    other = build_conversation("The quick brown fox.", voice=clip(1.2, 550.0))
    reused, codes = reused_by(engine, other)
    start = first_audio_position(engine, other)
    frames = engine.prompt_inputs(other)["audio_input_ids"].shape[1]
    # The text before the clip matches; the clip's codes differ within its first frames.
    assert start <= reused < start + frames
    reference, _ = generate_codes(engine, other, GREEDY.max_new_tokens)
    assert torch.equal(codes, reference)


def test_a_long_texts_next_chunk_reuses_the_chunk_before(
    engine: Engine, fresh_cache: PromptCache
) -> None:
    before = build_conversation("Before this.")
    reused_by(engine, before)
    earlier = engine.synthesize(before, GREEDY).codes
    chunk = build_conversation("And then this.", history=[("Before this.", earlier)])
    prompt_tokens = engine.prompt_inputs(before)["input_ids"].shape[1]
    reused, _ = reused_by(engine, chunk)
    assert reused >= prompt_tokens - 1  # the whole earlier prompt, up to its audio
    assert_same(engine.synthesize(chunk, GREEDY),
                generate_codes(engine, chunk, GREEDY.max_new_tokens))  # fmt: skip


def test_the_cache_holds_at_most_its_budget(engine: Engine, fresh_cache: PromptCache) -> None:
    texts = ["Hello there.", "Fine, thanks. And you?", "A third one, longer than both."]
    lengths = [engine.prompt_inputs(build_conversation(t))["input_ids"].shape[1] for t in texts]
    engine.prompt_cache = PromptCache(max(lengths) + 1)  # the fixture puts the engine's back
    for text in texts:
        engine.synthesize(build_conversation(text), GREEDY)
        assert engine.prompt_cache.tokens <= max(lengths) + 1
    engine.prompt_cache = PromptCache(0)  # PROMPT_CACHE_TOKENS=0: nothing is kept
    for text in texts:
        assert reused_by(engine, build_conversation(text))[0] == 0
    assert engine.prompt_cache.tokens == 0


def test_a_repeated_prompt_of_ids_alone_gives_the_same_codes(
    engine: Engine, fresh_cache: PromptCache
) -> None:
    """Model inputs without an attention mask (as bench/throughput.py makes them): the
    second run takes all but the last token from the cache and decodes the same codes."""
    ids = engine.prompt_inputs(build_conversation("Hello there."))["input_ids"]
    runs = [engine.decode(lambda: BatchFeature({"input_ids": ids}), GREEDY) for _ in range(2)]
    assert fresh_cache.reused_tokens == ids.shape[1] - 1
    assert torch.equal(torch.cat(runs[0].frames), torch.cat(runs[1].frames))


def together(engine: Engine, conversations: list[list[dict]]) -> list[object]:
    calls = [lambda c=c: engine.synthesize(c, GREEDY) for c in conversations]
    return admitted_together(engine, calls)


def test_prompts_that_arrive_together_prefill_in_one_forward_and_equal_generate(
    engine: Engine, fresh_cache: PromptCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four plain prompts of different lengths and a clone arrive at once, after the system
    prompt is cached: the four run as one padded batch on their cached beginnings, the
    clone (its clip comes after what they share) alone."""
    engine.synthesize(build_conversation("Warm the cache."), GREEDY)
    conversations = [build_conversation(text) for text in TEXTS]
    conversations.append(build_conversation("The quick brown fox.", voice=clip(1.2, 330.0)))
    references = [generate_codes(engine, c, GREEDY.max_new_tokens) for c in conversations]
    reused_before = fresh_cache.reused_tokens
    spy = ForwardSpy(engine, monkeypatch)
    results = together(engine, conversations)
    assert sorted(spy.batches) == [1, 4]
    assert fresh_cache.reused_tokens - reused_before >= 5 * prompt_cache.MIN_SHARED_TOKENS
    for result, reference in zip(results, references, strict=True):
        assert_same(result, reference)  # type: ignore[arg-type]


def test_prompts_with_nothing_cached_prefill_together_within_the_batch_bound(
    engine: Engine, fresh_cache: PromptCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    conversations = [build_conversation(text) for text in TEXTS]
    references = [generate_codes(engine, c, GREEDY.max_new_tokens) for c in conversations]
    longest = max(engine.prompt_inputs(c)["input_ids"].shape[1] for c in conversations)
    monkeypatch.setattr(prompt_cache, "BATCH_TOKENS", 2 * longest)  # two rows a forward
    spy = ForwardSpy(engine, monkeypatch)
    results = together(engine, conversations)
    assert spy.batches == [2, 2]
    assert fresh_cache.reused_tokens == 0
    for result, reference in zip(results, references, strict=True):
        assert_same(result, reference)  # type: ignore[arg-type]
