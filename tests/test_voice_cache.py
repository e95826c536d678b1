"""The reference voice cache: a clip is encoded once per tokenizer, in memory and on disk."""

from __future__ import annotations

import asyncio
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.request.voices import ReferenceClip
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.synthesis.voice_cache import (
    STALE_PARTIAL_S,
    CodesShape,
    VoiceCache,
    tokenizer_identity,
)
from support.audio import b64, make_wav
from support.engine import EncodeSpy


def _clip(freq: float = 220.0) -> np.ndarray:
    samples, _ = soundfile.read(io.BytesIO(make_wav(seconds=1.0, freq=freq)), dtype="float32")
    return samples


def _engine(base_env: dict[str, str], cache_dir: Path, items: int = 8) -> Engine:
    env = {**base_env, "VOICE_CACHE_PATH": str(cache_dir), "VOICE_CACHE_ITEMS": str(items)}
    engine = Engine(load_settings(env))
    engine.load()
    return engine


def test_hit_skips_the_encoder_and_gives_the_same_codes(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(base_env, tmp_path)
    spy = EncodeSpy(engine, monkeypatch)
    clip = _clip()
    first = engine.clip_codes(clip)
    second = engine.clip_codes(clip.copy())
    assert spy.calls == 1
    assert engine.voice_cache is not None and engine.voice_cache.hits == 1
    assert torch.equal(first, second)
    assert torch.equal(first, engine.encode_clip(clip).cpu())


def test_a_different_clip_is_encoded(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(base_env, tmp_path)
    spy = EncodeSpy(engine, monkeypatch)
    engine.clip_codes(_clip(220.0))
    engine.clip_codes(_clip(330.0))
    assert spy.calls == 2


def test_cached_clone_survives_a_restart_through_synthesize(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = ReferenceClip(_clip(), "Hello there.")
    conversation = build_conversation("Good morning.", voice=clip)
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ras_win_len=0)
    before = _engine(base_env, tmp_path).synthesize(conversation, params)

    restarted = _engine(base_env, tmp_path)  # a new process would start just like this
    spy = EncodeSpy(restarted, monkeypatch)
    after = restarted.synthesize(conversation, params)
    assert spy.calls == 0
    assert restarted.voice_cache is not None and restarted.voice_cache.disk_hits == 1
    assert torch.equal(before.codes, after.codes)
    assert before.prompt_tokens == after.prompt_tokens


def test_library_voices_are_encoded_at_start_up(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(base_env, tmp_path)
    service = SpeechService(engine.settings, engine)
    assert service.warm_voices() == 1  # the library holds `alice`
    spy = EncodeSpy(engine, monkeypatch)
    clip = service.voices.resolve("alice", "voice")
    assert isinstance(clip, ReferenceClip)
    engine.clip_codes(clip.samples)
    assert spy.calls == 0


def test_memory_is_bounded_least_recently_used_first() -> None:
    encoded: list[float] = []

    def encode(samples: np.ndarray) -> torch.Tensor:
        encoded.append(float(samples[0]))
        return torch.full((2, 3), int(samples[0]))

    cache = VoiceCache("commit:abc", max_items=2, directory=None)
    clips = [np.full(10, value, dtype=np.float32) for value in (1.0, 2.0, 3.0)]
    cache.codes(clips[0], encode)
    cache.codes(clips[1], encode)
    cache.codes(clips[0], encode)  # 1 is now the most recent; 2 goes next
    cache.codes(clips[2], encode)
    cache.codes(clips[0], encode)
    cache.codes(clips[1], encode)
    assert encoded == [1.0, 2.0, 3.0, 2.0]


def test_another_tokenizer_does_not_share_codes(tmp_path: Path) -> None:
    clip = np.ones(10, dtype=np.float32)
    first = VoiceCache("commit:one", 4, tmp_path)
    first.codes(clip, lambda s: torch.zeros((2, 3), dtype=torch.long))
    second = VoiceCache("commit:two", 4, tmp_path)
    codes = second.codes(clip, lambda s: torch.ones((2, 3), dtype=torch.long))
    assert second.misses == 1 and int(codes.sum()) == 6


def test_an_unreadable_file_is_encoded_again(tmp_path: Path) -> None:
    clip = np.ones(10, dtype=np.float32)
    cache = VoiceCache("commit:one", 4, tmp_path)
    cache.codes(clip, lambda s: torch.zeros((2, 3), dtype=torch.long))
    for file in tmp_path.rglob("*.pt"):
        file.write_bytes(b"torn")
    fresh = VoiceCache("commit:one", 4, tmp_path)
    codes = fresh.codes(clip, lambda s: torch.ones((2, 3), dtype=torch.long))
    assert fresh.misses == 1 and int(codes.sum()) == 6
    again = VoiceCache("commit:one", 4, tmp_path)
    assert int(again.codes(clip, lambda s: torch.zeros((2, 3))).sum()) == 6  # rewritten


def test_identity_without_a_commit_follows_the_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    before = tokenizer_identity(tmp_path, None)
    assert tokenizer_identity(tmp_path, "abc") == "commit:abc"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert tokenizer_identity(tmp_path, None) != before


SHAPE = CodesShape(codebooks=3, codebook_size=16)


@pytest.mark.parametrize(
    ("planted", "why"),
    [
        (torch.zeros((2, 3)), "float32, not int64"),
        (torch.zeros((2, 4), dtype=torch.long), "shape (2, 4), not (frames, 3)"),
        (torch.zeros((2, 3, 1), dtype=torch.long), "shape (2, 3, 1)"),
        (torch.zeros((0, 3), dtype=torch.long), "shape (0, 3)"),
        (torch.full((2, 3), 16, dtype=torch.long), "codes 16..16, outside 0..15"),
        (torch.full((2, 3), -1, dtype=torch.long), "codes -1..-1, outside 0..15"),
        ({"codes": torch.zeros((2, 3), dtype=torch.long)}, "holds dict, not a tensor"),
    ],
)
def test_a_foreign_file_on_the_volume_is_refused(
    tmp_path: Path, planted: object, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Only codes this model can take are loaded; anything else is encoded again."""
    clip = np.ones(10, dtype=np.float32)
    cache = VoiceCache("commit:one", 4, tmp_path)
    cache.bind(SHAPE, None)
    cache.codes(clip, lambda s: torch.zeros((2, 3), dtype=torch.long))
    [file] = tmp_path.rglob("*.pt")
    torch.save(planted, file)
    fresh = VoiceCache("commit:one", 4, tmp_path)
    fresh.bind(SHAPE, None)
    codes = fresh.codes(clip, lambda s: torch.ones((2, 3), dtype=torch.long))
    assert fresh.misses == 1 and int(codes.sum()) == 6
    assert why in caplog.text


def test_a_worker_checks_cache_files_against_its_model(
    base_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through a request: out-of-range codes planted for a clip are not put in a prompt."""
    clip = make_wav(seconds=1.0, freq=410.0)
    job = {
        "text": "Hi.",
        "max_new_tokens": 4,
        "voice": {"audio_base64": b64(clip), "transcript": "t"},
    }
    worker = Worker(SpeechService(_engine(base_env, tmp_path).settings))
    assert asyncio.run(worker.handle({"input": job}))["voice_codes"]["encoded"] == 1
    [file] = tmp_path.rglob("*.pt")
    good = torch.load(file, weights_only=True)
    torch.save(torch.full_like(good, 10**6), file)
    again = Worker(SpeechService(worker.settings))
    spy = EncodeSpy(again.service.engine, monkeypatch)
    output = asyncio.run(again.handle({"input": job}))
    assert output["voice_codes"]["encoded"] == 1 and spy.calls == 1
    assert torch.equal(torch.load(file, weights_only=True), good)  # rewritten


def test_the_disk_quota_evicts_the_least_recently_used(tmp_path: Path) -> None:
    def encode(samples: np.ndarray) -> torch.Tensor:
        return torch.full((100, 3), int(samples[0]), dtype=torch.long)

    cache = VoiceCache("commit:one", 0, tmp_path)  # nothing in memory: every use is the disk's
    cache.codes(np.full(10, 1.0, dtype=np.float32), encode)
    [one] = tmp_path.rglob("*.pt")
    size = one.stat().st_size
    cache.bind(SHAPE, max_bytes=int(2.5 * size))  # room for two files
    clips = [np.full(10, value, dtype=np.float32) for value in (1.0, 2.0, 3.0)]
    cache.codes(clips[1], encode)
    old = time.time() - 100
    for index, file in enumerate(sorted(tmp_path.rglob("*.pt"), key=lambda f: f.stat().st_mtime)):
        os.utime(file, (old + index, old + index))
    cache.codes(clips[0], encode)  # a disk hit: clip 1 is now the most recently used
    assert cache.disk_hits == 1
    cache.codes(clips[2], encode)  # over the quota: clip 2, used longest ago, goes
    assert sum(f.stat().st_size for f in tmp_path.rglob("*.pt")) <= 2.5 * size
    kept = {cache.key(c) for c in clips if (cache.directory / f"{cache.key(c)}.pt").exists()}  # type: ignore[operator]
    assert kept == {cache.key(clips[0]), cache.key(clips[2])}


def test_stale_partial_files_are_swept(tmp_path: Path) -> None:
    cache = VoiceCache("commit:one", 0, tmp_path)
    cache.bind(SHAPE, max_bytes=10_000_000)
    cache.codes(np.ones(10, dtype=np.float32), lambda s: torch.zeros((2, 3), dtype=torch.long))
    assert cache.directory is not None
    stale, fresh = cache.directory / ".a.pt.1.2.partial", cache.directory / ".b.pt.1.3.partial"
    stale.write_bytes(b"torn")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * STALE_PARTIAL_S
    os.utime(stale, (old, old))
    cache.codes(np.zeros(10, dtype=np.float32), lambda s: torch.zeros((2, 3), dtype=torch.long))
    assert not stale.exists() and fresh.exists()
