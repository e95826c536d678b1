"""The voice library in-process: the queue API's four actions, every refusal, atomic
writes (the rename race, torn staging), and keeping a take (its codes used as they are)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from higgs_runpod.errors import VoiceExistsError
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.library import store as library
from higgs_runpod.library.store import NewVoice, VoiceStore, list_library
from higgs_runpod.request.schema import parse_request
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.synthesis.engine import Engine
from support.audio import b64, make_wav
from support.engine import EncodeSpy

CLIP = make_wav(seconds=1.0, freq=200.0)


def library_worker(settings: Settings, engine: Engine, path: Path, **update: Any) -> Worker:
    return Worker(
        SpeechService(settings.model_copy(update={"voices_path": path, **update}), engine)
    )


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(worker.handle({"id": "job-1", "input": job_input}))


def create(worker: Worker, name: str = "bob", **fields: Any) -> dict[str, Any]:
    job = {"action": "voice.create", "name": name, "transcript": "Hi there.",
           "audio_base64": b64(CLIP), **fields}  # fmt: skip
    return run(worker, job)


def test_the_four_actions(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    worker = library_worker(settings, engine, tmp_path)
    made = create(worker, description="Warm.", consent="Bob agreed on 2026-01-05.")
    assert made == {
        "name": "bob", "transcript": "Hi there.", "description": "Warm.",
        "consent": "Bob agreed on 2026-01-05.", "created_at": made["created_at"],
        "source": "upload", "duration_s": 1.0,
    }  # fmt: skip
    assert made["created_at"].endswith("Z")
    assert run(worker, {"action": "voice.list"}) == {"voices": [made]}
    assert run(worker, {"action": "voice.get", "name": "bob"}) == made
    fetched = run(worker, {"action": "voice.get", "name": "bob", "audio": True})
    assert fetched.pop("audio_base64").startswith("UklGR")  # RIFF: the stored WAV
    assert (tmp_path / "bob" / "codes.pt").is_file()  # encoded once, at create
    assert run(worker, {"action": "voice.delete", "name": "bob"}) == {"deleted": "bob"}
    assert run(worker, {"action": "voice.list"}) == {"voices": []}
    assert sorted(os.listdir(tmp_path)) == []
    assert run(worker, {"action": "voice.delete", "name": "bob"}) == {
        "error": "name: no library voice is called 'bob'"
    }


def test_overwrite_replaces_the_voice(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    worker = library_worker(settings, engine, tmp_path)
    create(worker)
    assert "already called 'bob'" in create(worker, transcript="Again.")["error"]
    assert create(worker, transcript="Again.", overwrite=True)["transcript"] == "Again."
    assert [voice.transcript for voice in list_library(tmp_path)] == ["Again."]


def test_an_overwrite_never_leaves_the_name_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new voice is in place before the old one's files are deleted (which takes a
    while on a network volume), so a request meanwhile finds one of the two, never none."""
    store = VoiceStore(tmp_path, max_voices=10)
    store.create(_new_voice("bob"))
    seen_while_deleting: list[object] = []
    rmtree = library.shutil.rmtree

    def watching_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(".deleted"):
            seen_while_deleting.append(library.find_voice(tmp_path, "bob"))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(library.shutil, "rmtree", watching_rmtree)
    replaced = store.create(replace(_new_voice("bob"), transcript="Again."), overwrite=True)
    assert replaced.transcript == "Again."
    assert len(seen_while_deleting) == 1 and seen_while_deleting[0] is not None
    assert sorted(os.listdir(tmp_path)) == ["bob"]


@pytest.mark.parametrize(
    ("fields", "update", "message"),
    [
        ({"name": "-bob"}, {}, "name: must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"),
        ({"name": "bob.v2"}, {}, "name: must match"),
        ({"name": "../bob"}, {}, "name: must match"),
        ({"name": "b" * 65}, {}, "name: string should have at most 64 characters"),
        ({"name": 7}, {}, "name: input should be a valid string"),
        ({"name": "Alloy"}, {}, "name: 'Alloy' is an OpenAI voice name, reserved"),
        ({"name": "second"}, {"max_voices": 1}, "the library holds 1 voices (MAX_VOICES)"),
        ({"transcript": None}, {}, "transcript: is required"),
        ({"transcript": "  "}, {}, "transcript: must not be empty"),
        ({"transcript": "t" * 2001}, {}, "transcript: string should have at most 2000"),
        ({}, {"voice_require_consent": True}, "consent: is required"),
        ({"audio_base64": b64(b"RIFF junk" * 50)}, {}, "audio: audio could not be decoded"),
        ({"audio_base64": b64(make_wav(seconds=0.2))}, {}, "audio: audio is shorter than 0.5"),
        ({"audio_base64": b64(make_wav(3.0))}, {"max_ref_audio_seconds": 2.0}, "longer than 2 s"),
        ({"audio_base64": b64(CLIP)}, {"max_ref_audio_bytes": 1000}, "larger than 1000 bytes"),
        ({"audio_base64": "!!"}, {}, "audio_base64: is not valid base64"),
        ({"audio_url": "http://x.example/a.wav"}, {}, "audio: give exactly one clip"),
        ({"audio_base64": None}, {}, "audio: give exactly one clip"),
        ({"volume": 3}, {}, "volume: unknown field"),
    ],
)  # fmt: skip
def test_every_refusal(
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    fields: dict[str, Any],
    update: dict[str, Any],
    message: str,
) -> None:
    worker = library_worker(settings, engine, tmp_path, **update)
    if update.get("max_voices") == 1:
        assert "error" not in create(worker, "first")
    job = {"action": "voice.create", "name": "bob", "transcript": "Hi.", "audio_base64": b64(CLIP)}
    job.update(fields)
    job = {key: value for key, value in job.items() if value is not None}
    error = run(worker, job)["error"]
    assert message.replace("2 s", "2 seconds") in error
    assert [voice.name for voice in list_library(tmp_path)] == (
        ["first"] if update.get("max_voices") == 1 else []
    )


def test_openai_names_when_the_operator_allows_them(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = library_worker(settings, engine, tmp_path, voice_allow_openai_names=True)
    assert create(worker, "alloy")["name"] == "alloy"


def test_unknown_action(settings: Settings, engine: Engine, tmp_path: Path) -> None:
    worker = library_worker(settings, engine, tmp_path)
    assert run(worker, {"action": "voice.rename"})["error"].startswith("action: must be one of")
    assert run(worker, {"action": "voice.list", "name": "x"}) == {"error": "name: unknown field"}


def _new_voice(name: str) -> NewVoice:
    return NewVoice(name=name, clip_wav=CLIP, duration_s=1.0, transcript="Hi.")


def test_a_lost_rename_is_a_conflict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both writers passed the existence check: the rename decides, and the loser's
    staging is gone."""
    store = VoiceStore(tmp_path, max_voices=10)
    store.create(_new_voice("bob"))
    monkeypatch.setattr(library, "find_voice", lambda root, name: None)
    with pytest.raises(VoiceExistsError, match="already called 'bob'"):
        store.create(_new_voice("bob"))
    assert os.listdir(tmp_path) == ["bob"]


def test_a_create_that_raced_past_max_voices_leaves_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both writers counted below the limit; the one that finds the library over it after
    its rename takes its voice out again, so the limit holds."""
    store = VoiceStore(tmp_path, max_voices=1)
    write = store._write

    def other_worker_wins_meanwhile(staging: Path, voice: NewVoice) -> None:
        VoiceStore(tmp_path, max_voices=1).create(_new_voice("carol"))
        write(staging, voice)

    monkeypatch.setattr(store, "_write", other_worker_wins_meanwhile)
    with pytest.raises(library.VoiceLimitError, match=r"holds 1 voices \(MAX_VOICES\)"):
        store.create(_new_voice("bob"))
    assert [voice.name for voice in list_library(tmp_path)] == ["carol"]
    assert os.listdir(tmp_path) == ["carol"]


RACER = """
import sys, time
from pathlib import Path
from higgs_runpod.errors import VoiceExistsError
from higgs_runpod.library.store import NewVoice, VoiceStore
root, name, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
clip = Path(sys.argv[4]).read_bytes()
store = VoiceStore(root, max_voices=100)
while time.time() < start:
    pass
try:
    store.create(NewVoice(name=name, clip_wav=clip, duration_s=1.0, transcript=sys.argv[5]))
    print("created")
except VoiceExistsError:
    print("conflict")
"""


def test_two_processes_creating_one_name(tmp_path: Path) -> None:
    root, clip = tmp_path / "voices", tmp_path / "clip.wav"
    clip.write_bytes(CLIP)
    for round_ in range(3):
        name, start = f"v{round_}", time.time() + 1.5
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", RACER, str(root), name, str(start), str(clip), who],
                stdout=subprocess.PIPE,
                text=True,
            )
            for who in ("one", "two")
        ]
        outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
        assert outcomes == ["conflict", "created"]
        meta = json.loads((root / name / "voice.json").read_text())
        assert meta["transcript"] in ("one", "two")
    assert sorted(os.listdir(root)) == ["v0", "v1", "v2"]


def test_staging_is_never_listed_and_stale_staging_is_swept(tmp_path: Path) -> None:
    torn = tmp_path / ".bob.123.abc.partial"
    torn.mkdir()
    (torn / "clip.wav").write_bytes(CLIP[:100])  # a writer that died mid-write
    assert list_library(tmp_path) == []
    old = time.time() - 2 * library.STALE_STAGING_S
    os.utime(torn, (old, old))
    VoiceStore(tmp_path, 10).create(_new_voice("carol"))
    assert os.listdir(tmp_path) == ["carol"]


def test_hand_copied_voices_are_listed_and_deleted(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    """A hand-copied voice's codes go through the voice cache; deleting it drops them."""
    voices, cache_dir = tmp_path / "voices", tmp_path / "cache"
    voices.mkdir()
    (voices / "dan.wav").write_bytes(CLIP)
    (voices / "dan.txt").write_text("I am Dan.\n")
    env = {**base_env, "VOICES_PATH": str(voices), "VOICE_CACHE_PATH": str(cache_dir)}
    worker = Worker(SpeechService(load_settings(env)))
    [listed] = run(worker, {"action": "voice.list"})["voices"]
    assert (listed["source"], listed["transcript"], listed["duration_s"]) == (
        "file",
        "I am Dan.",
        1.0,
    )
    spoken = run(worker, {"text": "Hello.", "voice": "dan", "max_new_tokens": 5})
    assert spoken["voice_codes"]["encoded"] == 1
    assert len(list(cache_dir.rglob("*.pt"))) == 1
    assert run(worker, {"action": "voice.delete", "name": "dan"}) == {"deleted": "dan"}
    assert list(cache_dir.rglob("*.pt")) == []
    assert os.listdir(voices) == []
    assert "unknown voice 'dan'" in run(worker, {"text": "Hello.", "voice": "dan"})["error"]


def test_a_kept_take_is_a_voice_with_the_generated_codes(
    settings: Settings, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = library_worker(settings, engine, tmp_path)
    job = {"text": "Keep this one.", "seed": 4, "max_new_tokens": 40,
           "save_voice": {"name": "kept", "description": "A take.", "consent": "Mine."}}  # fmt: skip
    speech = asyncio.run(worker.service.speak(parse_request(job, worker.settings)))
    saved = speech.metadata()["saved_voice"]
    assert (saved["name"], saved["source"], saved["transcript"]) == (
        "kept",
        "take",
        "Keep this one.",
    )
    assert saved["duration_s"] == pytest.approx(speech.synthesis.frames * 0.04)
    record = torch.load(tmp_path / "kept" / "codes.pt", weights_only=True)
    assert torch.equal(record["codes"], speech.synthesis.codes)  # as generated, not re-encoded

    spy = EncodeSpy(engine, monkeypatch)
    again = run(worker, {"text": "Now in the kept voice.", "voice": "kept", "max_new_tokens": 10})
    assert again["voice_codes"] == {"library": 1, "memory": 0, "disk": 0, "encoded": 0}
    assert again["timings_ms"]["voice_encode"] == 0.0
    assert spy.calls == 0
    # The prompt holds the take's codes: BOS + frames + EOS beyond a plain prompt's turns.
    plain = run(worker, {"text": "Now in the kept voice.", "max_new_tokens": 10})
    assert (
        again["usage"]["prompt_tokens"]
        >= plain["usage"]["prompt_tokens"] + record["codes"].shape[0]
    )


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"text": "[SPEAKER0] Hi. [SPEAKER1] Yo."}, "save_voice: only a single-voice take"),
        ({"text": "A. " * 300, "chunking": {"method": "word", "max_words": 10}}, "chunks; only a single-chunk take"),
        ({"text": "Hi.", "max_new_tokens": 1000}, "max_new_tokens: must be at most 750 with save_voice"),
        ({"text": "Hi.", "save_voice": {"name": "bad name"}}, "save_voice.name: must match"),
        ({"text": "Hi.", "save_voice": {"name": "echo"}}, "save_voice.name: 'echo' is an OpenAI voice name"),
        ({"text": "Hi.", "save_voice": {"name": "taken"}}, "save_voice.name: a library voice is already called 'taken'"),
    ],
)  # fmt: skip
def test_takes_that_cannot_be_kept_are_refused_before_generating(
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job: dict[str, Any],
    message: str,
) -> None:
    worker = library_worker(settings, engine, tmp_path)
    create(worker, "taken")
    generated: list[object] = []
    monkeypatch.setattr(worker.service, "generate", lambda *args, **kw: generated.append(args))
    error = run(worker, {"save_voice": {"name": "new"}, **job})["error"]
    assert message in error
    assert generated == []
    assert [voice.name for voice in list_library(tmp_path)] == ["taken"]


def test_a_take_without_consent_is_refused_when_consent_is_required(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = library_worker(settings, engine, tmp_path, voice_require_consent=True)
    error = run(worker, {"text": "Hi.", "save_voice": {"name": "new"}})["error"]
    assert error.startswith("save_voice.consent: is required")
