"""Remembered takes in-process: a request with remember_take writes its take, a voice create
with take_id keeps it exactly (the generated codes, no encode) and consumes it; every
refusal (bad, unknown, expired, kept, not keepable); the store's bounds."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from higgs_runpod.errors import TakeNotFoundError
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.library.takes import TAKES_DIR, Take, TakeStore
from higgs_runpod.request.schema import parse_request
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.engine import Engine
from support.audio import b64, make_wav
from support.engine import EncodeSpy

TAKE = {"text": "Keep this one.", "seed": 4, "max_new_tokens": 40, "remember_take": True}


def take_worker(settings: Settings, engine: Engine, path: Path, **update: Any) -> Worker:
    return Worker(
        SpeechService(settings.model_copy(update={"voices_path": path, **update}), engine)
    )


def run(worker: Worker, job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(worker.handle({"id": "job-1", "input": job_input}))


def keep(worker: Worker, take_id: Any, name: str = "kept", **fields: Any) -> dict[str, Any]:
    return run(worker, {"action": "voice.create", "name": name, "take_id": take_id, **fields})


def test_a_voice_kept_from_a_take_has_its_generated_codes(
    settings: Settings, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = take_worker(settings, engine, tmp_path)
    job = {**TAKE, "voice": {"description": "A calm, low voice."}}
    speech = asyncio.run(worker.service.speak(parse_request(job, worker.settings)))
    take_id = speech.metadata()["take_id"]
    take_dir = tmp_path / TAKES_DIR / take_id
    clip = (take_dir / "clip.wav").read_bytes()
    assert run(worker, {"action": "voice.list"}) == {"voices": []}  # a take is no voice

    spy = EncodeSpy(engine, monkeypatch)
    made = keep(worker, take_id, consent="Mine.")
    assert (made["name"], made["source"], made["transcript"], made["description"]) == (
        "kept", "take", "Keep this one.", "A calm, low voice.",
    )  # fmt: skip
    assert made["duration_s"] == pytest.approx(speech.synthesis.frames * 0.04)
    record = torch.load(tmp_path / "kept" / "codes.pt", weights_only=True)
    assert torch.equal(record["codes"], speech.synthesis.codes)  # as generated
    assert (tmp_path / "kept" / "clip.wav").read_bytes() == clip  # the take heard
    assert not take_dir.exists()  # consumed
    assert "take_id: no take" in keep(worker, take_id, "again")["error"]

    again = run(worker, {"text": "Now in the kept voice.", "voice": "kept", "max_new_tokens": 10})
    assert again["voice_codes"] == {"library": 1, "memory": 0, "disk": 0, "encoded": 0}
    assert spy.calls == 0  # neither the keep nor the speech encoded anything


def test_the_transcript_and_description_may_be_given(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = take_worker(settings, engine, tmp_path)
    take_id = run(worker, TAKE)["take_id"]
    made = keep(worker, take_id, transcript="Keep this one!", description="Mine.")
    assert (made["transcript"], made["description"]) == ("Keep this one!", "Mine.")


def test_a_streamed_take_names_its_id_in_the_final_event(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = take_worker(settings, engine, tmp_path)

    async def stream() -> list[dict[str, Any]]:
        job = {"id": "s", "input": {**TAKE, "stream": True}}
        return [item async for item in worker.handle_stream(job)]

    final = asyncio.run(stream())[-1]
    assert final["done"] is True
    assert (tmp_path / TAKES_DIR / final["take_id"] / "codes.pt").is_file()


@pytest.mark.parametrize(
    ("take_id", "message"),
    [
        ("../../etc/passwd", "take_id: must be a take id as a speech response gave it"),
        ("0" * 31 + "g", "take_id: must be a take id"),
        ("0" * 32 + "/x", "take_id: must be a take id"),
        (7, "take_id: input should be a valid string"),
        ("0" * 32, "take_id: no take '00000000000000000000000000000000': unknown, expired"),
    ],
)
def test_bad_and_unknown_take_ids_are_refused(
    settings: Settings, engine: Engine, tmp_path: Path, take_id: Any, message: str
) -> None:
    worker = take_worker(settings, engine, tmp_path)
    assert message in keep(worker, take_id)["error"]
    assert run(worker, {"action": "voice.list"}) == {"voices": []}


def test_an_expired_take_is_refused_and_removed(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    worker = take_worker(settings, engine, tmp_path)
    take_id = run(worker, TAKE)["take_id"]
    record_path = tmp_path / TAKES_DIR / take_id / "take.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "created": time.time() - 3601}))
    assert "take_id: no take" in keep(worker, take_id)["error"]
    assert list((tmp_path / TAKES_DIR).iterdir()) == []


@pytest.mark.parametrize(
    "damage",
    ["a record that is not JSON", "a record without its text", "codes that are no tensor",
     "a clip over the size a take can have"],
)  # fmt: skip
def test_a_take_damaged_on_the_volume_is_refused_by_name_and_removed(
    settings: Settings, engine: Engine, tmp_path: Path, damage: str
) -> None:
    """The volume is not trusted: whatever is written there by hand, a keep answers
    take_id's not-found error (never an internal one), and the worker serves on."""
    worker = take_worker(settings, engine, tmp_path)
    take_id = run(worker, TAKE)["take_id"]
    take_dir = tmp_path / TAKES_DIR / take_id
    record = json.loads((take_dir / "take.json").read_text())
    if damage == "a record that is not JSON":
        (take_dir / "take.json").write_text("{not json")
    elif damage == "a record without its text":
        (take_dir / "take.json").write_text(json.dumps({"created": record["created"]}))
    elif damage == "codes that are no tensor":
        torch.save({"codes": [1, 2, 3]}, take_dir / "codes.pt")
    else:  # 31 s of 16-bit samples at 24 kHz, past MAX_REF_AUDIO_SECONDS (30)
        (take_dir / "clip.wav").write_bytes(bytes(31 * 24_000 * 2 + 4096))
    answer = keep(worker, take_id)
    assert "take_id: no take" in answer["error"] and "unreadable" in answer["error"]
    assert list((tmp_path / TAKES_DIR).iterdir()) == []
    assert "take_id" in run(worker, TAKE)  # serving on


def test_a_take_that_cannot_become_the_voice_stays(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """A refused keep (the name taken, a clip as well) leaves the take to keep another way."""
    worker = take_worker(settings, engine, tmp_path)
    take_id = run(worker, TAKE)["take_id"]
    assert keep(worker, take_id, "first")["source"] == "take"
    second = run(worker, TAKE)["take_id"]
    assert "already called 'first'" in keep(worker, second, "first")["error"]
    both = keep(worker, second, "other", audio_base64=b64(make_wav()))
    assert "give exactly one clip: a file, audio_base64, audio_url or take_id" in both["error"]
    assert keep(worker, second, "second")["source"] == "take"


@pytest.mark.parametrize(
    ("job", "message"),
    [
        ({"text": "[SPEAKER0] Hi. [SPEAKER1] Yo."}, "remember_take: only a single-voice take"),
        ({"text": "A. " * 300, "chunking": {"method": "word", "max_words": 10}}, "remember_take: the text makes 30 chunks"),
        ({"text": "Hi.", "max_new_tokens": 1000}, "max_new_tokens: must be at most 750 with remember_take"),
        ({"text": "Hi.", "remember_take": "yes"}, "remember_take: input should be a valid boolean"),
    ],
)  # fmt: skip
def test_takes_that_cannot_be_kept_are_not_remembered(
    settings: Settings,
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    job: dict[str, Any],
    message: str,
) -> None:
    worker = take_worker(settings, engine, tmp_path)
    generated: list[object] = []
    monkeypatch.setattr(worker.service, "generate", lambda *args, **kw: generated.append(args))
    error = run(worker, {"remember_take": True, **job})["error"]
    assert message in error
    assert generated == []
    assert not (tmp_path / TAKES_DIR).exists()


def small_take(text: str) -> Take:
    return Take(make_wav(), torch.zeros((3, 2), dtype=torch.int64), text, None, "tok")


def test_the_store_sweeps_expired_and_oldest_takes(tmp_path: Path) -> None:
    store = TakeStore(tmp_path, ttl_s=3600.0, max_takes=2, max_seconds=30.0)
    for index, take_id in enumerate(["a" * 32, "b" * 32, "c" * 32]):
        store.write(take_id, small_take(f"take {index}"))
        time.sleep(0.01)
    assert sorted(p.name for p in store.root.iterdir()) == ["b" * 32, "c" * 32]
    old = store.root / ("b" * 32) / "take.json"
    old.write_text(json.dumps({**json.loads(old.read_text()), "created": time.time() - 4000}))
    store.write("d" * 32, small_take("take 3"))
    assert sorted(p.name for p in store.root.iterdir()) == ["c" * 32, "d" * 32]
    claimed = store.claim("c" * 32)
    assert store.read(claimed, "c" * 32).text == "take 2"
    assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == ["d" * 32]


def test_a_take_too_short_to_keep_fails_at_the_keep_not_before(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """The request that made it still answers (its audio was fine); only the keep refuses."""
    worker = take_worker(settings, engine, tmp_path)
    spoken = run(worker, {**TAKE, "max_new_tokens": 5})
    assert spoken["duration_s"] < 0.5
    error = keep(worker, spoken["take_id"])["error"]
    assert error == "take_id: audio is shorter than 0.5 seconds"


def test_two_keeps_of_one_take_at_once_give_it_to_one(tmp_path: Path) -> None:
    store = TakeStore(tmp_path, ttl_s=3600.0, max_takes=10, max_seconds=30.0)
    store.write("e" * 32, small_take("shared"))
    barrier = threading.Barrier(8)
    won: list[Path] = []
    lost: list[TakeNotFoundError] = []

    def claim() -> None:
        barrier.wait()
        try:
            won.append(store.claim("e" * 32))
        except TakeNotFoundError as error:
            lost.append(error)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(lost)) == (1, 7)
    assert store.read(won[0], "e" * 32).text == "shared"
