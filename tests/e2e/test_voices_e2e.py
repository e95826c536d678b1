"""The voice library end to end: two HTTP workers sharing one VOICES_PATH, RunPod's local
API server for the queue actions, the client against both, and the CLI on the volume."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from higgs_runpod.errors import ClientError
from higgs_runpod.library.takes import Take, TakeStore
from higgs_runpod.tools.client import Endpoint
from higgs_runpod.tools.library_client import Voices
from support.audio import b64, make_wav
from support.cli import cli
from support.servers import HttpServer, LocalServer, serving

KEY = "voices-key-0123456789"
AUTH = {"X-API-Key": KEY}
CLIP = make_wav(seconds=1.0, freq=250.0)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared-voices")


@pytest.fixture(scope="module")
def workers(
    base_env: dict[str, str], shared: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[HttpServer, HttpServer]]:
    """Two HTTP workers on one VOICES_PATH, each with its own voice cache."""
    logs = tmp_path_factory.mktemp("workers")
    servers = [
        HttpServer(
            {
                **base_env,
                "HIGGS_API_KEY": KEY,
                "VOICES_PATH": str(shared),
                "VOICE_CACHE_PATH": str(logs / f"cache{i}"),
            },
            logs / f"worker{i}.log",
        )
        for i in range(2)
    ]
    try:
        for server in servers:
            server.wait_ready()
        yield servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


def upload(server: HttpServer, name: str, **fields: str) -> httpx.Response:
    form = {"name": name, "transcript": "A low tone.", **fields}
    return httpx.post(f"{server.url}/v1/audio/voices", headers=AUTH, data=form,
                      files={"audio": ("tone.wav", CLIP, "audio/wav")}, timeout=60)  # fmt: skip


def speak_sse(server: HttpServer, voice: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    """Speak over SSE; the status and the done event (which says how the codes were had)."""
    body = {"model": "tts-1", "input": "Hello there.", "voice": voice, "stream_format": "sse",
            "max_new_tokens": 20, "seed": 3, **extra}  # fmt: skip
    response = httpx.post(f"{server.url}/v1/audio/speech", headers=AUTH, json=body, timeout=120)
    if response.status_code != 200:
        return response.status_code, response.json()
    events = [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    return 200, events[-1]


def listed(server: HttpServer) -> dict[str, dict[str, Any]]:
    voices = httpx.get(f"{server.url}/v1/audio/voices", headers=AUTH).json()["voices"]
    return {voice["name"]: voice for voice in voices if voice["type"] == "library"}


def test_a_voice_made_on_one_worker_speaks_on_the_other(
    workers: tuple[HttpServer, HttpServer],
) -> None:
    one, other = workers
    made = upload(one, "tone", description="A test tone.", consent="Synthetic.")
    assert made.status_code == 201, made.text
    voice = made.json()
    assert (voice["name"], voice["source"], voice["duration_s"]) == ("tone", "upload", 1.0)
    assert listed(other)["tone"]["transcript"] == "A low tone."
    assert httpx.get(f"{other.url}/v1/audio/voices/tone", headers=AUTH).json() == voice
    clip = httpx.get(f"{other.url}/v1/audio/voices/tone/audio", headers=AUTH)
    assert clip.headers["content-type"] == "audio/wav" and clip.content[:4] == b"RIFF"
    status, done = speak_sse(other, "tone")
    assert status == 200
    assert done["voice_codes"] == {"library": 1, "memory": 0, "disk": 0, "encoded": 0}
    assert "alloy" in {v["name"] for v in httpx.get(f"{other.url}/v1/audio/voices",
                                                     headers=AUTH).json()["voices"]}  # fmt: skip

    assert upload(other, "tone").status_code == 409
    assert httpx.delete(f"{one.url}/v1/audio/voices/tone", headers=AUTH).status_code == 204
    status, error = speak_sse(other, "tone")
    assert status == 400 and "unknown voice 'tone'" in error["error"]["message"]
    assert httpx.get(f"{other.url}/v1/audio/voices/tone", headers=AUTH).status_code == 404
    assert httpx.delete(f"{other.url}/v1/audio/voices/tone", headers=AUTH).status_code == 404


def test_a_kept_take_is_listed_and_speaks_without_an_encode(
    workers: tuple[HttpServer, HttpServer], shared: Path
) -> None:
    one, other = workers
    body = {"model": "tts-1", "input": "Keep this take.", "response_format": "wav", "seed": 8,
            "max_new_tokens": 40, "save_voice": {"name": "take1", "consent": "Generated."}}  # fmt: skip
    response = httpx.post(f"{one.url}/v1/audio/speech", headers=AUTH, json=body, timeout=120)
    assert response.status_code == 200 and response.headers["x-saved-voice"] == "take1"
    voice = listed(other)["take1"]
    assert (voice["source"], voice["transcript"]) == ("take", "Keep this take.")
    assert (shared / "take1" / "codes.pt").is_file()
    status, done = speak_sse(other, "take1")
    assert status == 200 and done["voice_codes"]["encoded"] == 0
    assert done["voice_codes"]["library"] == 1
    again = httpx.post(f"{one.url}/v1/audio/speech", headers=AUTH, json=body, timeout=120)
    assert again.status_code == 409 and "already called 'take1'" in again.text


def test_a_remembered_take_is_kept_on_the_other_worker_exactly(
    workers: tuple[HttpServer, HttpServer], shared: Path
) -> None:
    """The take heard is the voice kept: its codes and clip as generated on one worker, kept
    through the other, with no second generation and no encode."""
    one, other = workers
    body = {"model": "tts-1", "input": "Remember this take.", "response_format": "wav",
            "seed": 9, "max_new_tokens": 40, "remember_take": True}  # fmt: skip
    response = httpx.post(f"{one.url}/v1/audio/speech", headers=AUTH, json=body, timeout=120)
    assert response.status_code == 200, response.text
    take_id = response.headers["x-take-id"]
    take = shared / ".takes" / take_id
    codes = torch.load(take / "codes.pt", weights_only=True)
    clip = (take / "clip.wav").read_bytes()
    assert "remembered" not in listed(other)

    keep = {"name": "remembered", "take_id": take_id, "consent": "Generated."}
    made = httpx.post(f"{other.url}/v1/audio/voices", headers=AUTH, json=keep, timeout=60)
    assert made.status_code == 201, made.text
    assert (made.json()["source"], made.json()["transcript"]) == ("take", "Remember this take.")
    record = torch.load(shared / "remembered" / "codes.pt", weights_only=True)
    assert torch.equal(record["codes"], codes)
    assert (shared / "remembered" / "clip.wav").read_bytes() == clip
    status, done = speak_sse(one, "remembered")
    assert status == 200 and done["voice_codes"]["library"] == 1
    assert done["voice_codes"]["encoded"] == 0

    again = httpx.post(f"{one.url}/v1/audio/voices", headers=AUTH,
                       json={**keep, "name": "twice"}, timeout=60)  # fmt: skip
    assert again.status_code == 404 and again.json()["error"]["code"] == "take_not_found"
    assert again.json()["error"]["param"] == "take_id"
    bad = httpx.post(f"{one.url}/v1/audio/voices", headers=AUTH,
                     json={**keep, "take_id": "../remembered"}, timeout=60)  # fmt: skip
    assert bad.status_code == 400 and "take_id: must be a take id" in bad.text


def test_an_sse_take_names_its_id_in_the_done_event(
    workers: tuple[HttpServer, HttpServer], shared: Path
) -> None:
    one, _ = workers
    status, done = speak_sse(one, "alloy", remember_take=True)
    assert status == 200
    assert (shared / ".takes" / done["take_id"] / "codes.pt").is_file()
    status, error = speak_sse(one, "alloy", remember_take=True, max_new_tokens=900)
    assert status == 400
    assert "must be at most 750 with remember_take" in error["error"]["message"]


def test_concurrent_creates_of_one_name_give_one_201_and_one_409(
    workers: tuple[HttpServer, HttpServer],
) -> None:
    statuses: list[int] = []
    barrier = threading.Barrier(2)

    def create(server: HttpServer) -> None:
        barrier.wait()
        statuses.append(upload(server, "race").status_code)

    threads = [threading.Thread(target=create, args=(server,)) for server in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409]


def test_a_clip_cut_off_mid_upload_leaves_nothing(
    workers: tuple[HttpServer, HttpServer], shared: Path
) -> None:
    one, _ = workers
    request = httpx.Request(
        "POST", f"{one.url}/v1/audio/voices", headers=AUTH,
        data={"name": "torn", "transcript": "t"}, files={"audio": ("a.wav", CLIP)},
    )  # fmt: skip
    body = request.read()
    head = f"POST /v1/audio/voices HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n"
    head += f"Content-Type: {request.headers['content-type']}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", one.port)) as sock:
        sock.sendall(head.encode() + body[: len(body) // 2])
    assert "torn" not in listed(one)
    assert not any(
        path.name.startswith(".torn") or path.name == "torn" for path in shared.iterdir()
    )
    assert upload(one, "after").status_code == 201  # the worker keeps serving


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"data": {"name": "x y", "transcript": "t"}, "files": {"audio": ("a", CLIP)}}, 400, "name: must match"),
        ({"data": {"name": "nova", "transcript": "t"}, "files": {"audio": ("a", CLIP)}}, 400, "OpenAI voice name"),
        ({"data": {"name": "ok"}, "files": {"audio": ("a", CLIP)}}, 400, "transcript: is required"),
        ({"files": {"name": (None, "ok"), "transcript": (None, "t")}}, 400, "give exactly one clip"),
        ({"data": {"name": "ok", "transcript": "t", "bogus": "1"}, "files": {"audio": ("a", CLIP)}}, 400, "unknown form field 'bogus'"),
        ({"data": {"name": "ok", "transcript": "t"}, "files": {"audio": ("a", b"junk" * 99)}}, 400, "audio: audio could not be decoded"),
        ({"json": {"name": "ok", "transcript": "t", "audio_base64": "!!"}}, 400, "audio_base64: is not valid base64"),
        ({"content": b"name=ok", "headers": {"Content-Type": "text/plain"}}, 415, "multipart/form-data or application/json"),
        ({"data": {"name": "ok", "transcript": "t"}, "files": {"audio": ("a", CLIP)}, "headers": {"Origin": "https://evil.example"}}, 403, "another origin"),
    ],
)  # fmt: skip
def test_http_refusals(
    workers: tuple[HttpServer, HttpServer], kwargs: dict[str, Any], status: int, message: str
) -> None:
    one, _ = workers
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = httpx.post(f"{one.url}/v1/audio/voices", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert "ok" not in listed(one)


def test_json_create_and_the_key(workers: tuple[HttpServer, HttpServer]) -> None:
    one, _ = workers
    body = {"name": "json1", "transcript": "From JSON.", "audio_base64": b64(CLIP)}
    assert httpx.post(f"{one.url}/v1/audio/voices", json=body).status_code == 401
    made = httpx.post(f"{one.url}/v1/audio/voices", headers=AUTH, json=body, timeout=60)
    assert made.status_code == 201 and made.json()["transcript"] == "From JSON."


@pytest.fixture(scope="module")
def queue_server(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    voices = tmp_path_factory.mktemp("queue-voices")
    env = {**base_env, "VOICES_PATH": str(voices)}
    with serving(LocalServer(env, tmp_path_factory.mktemp("queue") / "server.log")) as server:
        yield server


def test_the_four_actions_through_the_local_api_server(queue_server: LocalServer) -> None:
    def job(**fields: Any) -> dict[str, Any]:
        return queue_server.runsync(fields)

    made = job(action="voice.create", name="q1", transcript="Queued.", audio_base64=b64(CLIP))
    assert made["status"] == "COMPLETED" and made["output"]["source"] == "upload"
    assert [v["name"] for v in job(action="voice.list")["output"]["voices"]] == ["q1"]
    assert job(action="voice.get", name="q1")["output"] == made["output"]
    spoken = job(text="Hi.", voice="q1", max_new_tokens=10)["output"]
    assert spoken["voice_codes"]["encoded"] == 0 and spoken["voice_codes"]["library"] == 1
    conflict = job(action="voice.create", name="q1", transcript="x", audio_base64=b64(CLIP))
    assert conflict["status"] == "FAILED" and "already called 'q1'" in conflict["error"]
    kept = job(text="A take.", max_new_tokens=30, save_voice={"name": "q2"})["output"]
    assert kept["saved_voice"]["source"] == "take"
    assert job(action="voice.delete", name="q1")["output"] == {"deleted": "q1"}
    missing = job(action="voice.get", name="q1")
    assert missing["status"] == "FAILED" and "no library voice is called 'q1'" in missing["error"]


def test_the_client_against_both_servers(
    queue_server: LocalServer, workers: tuple[HttpServer, HttpServer]
) -> None:
    one, _ = workers
    for voices in (
        Voices(endpoint=Endpoint(queue_server.url)),
        Voices(http_url=one.url, http_key=KEY),
    ):
        with voices:
            made = voices.add("client1", CLIP, "By the client.", description="Mine.")
            assert made["description"] == "Mine."
            assert "client1" in [v["name"] for v in voices.list()]
            assert voices.get("client1")["transcript"] == "By the client."
            voices.remove("client1")
            with pytest.raises(ClientError, match="client1"):
                voices.get("client1")


def test_the_cli_fills_a_volume_and_calls_servers(
    base_env: dict[str, str], tmp_path: Path, workers: tuple[HttpServer, HttpServer]
) -> None:
    clip = tmp_path / "clip.wav"
    clip.write_bytes(CLIP)
    volume = {"VOICES_PATH": str(tmp_path / "volume")}
    added = cli("voices", "add", "pre1", str(clip), "--transcript", "Pre-filled.",
                "--consent", "Me.", env=volume)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["consent"] == "Me."
    assert cli("voices", "list", env=volume).stdout.startswith("pre1\tupload\t1.0 s\tPre-filled.")
    assert json.loads(cli("voices", "get", "pre1", env=volume).stdout)["name"] == "pre1"
    taken = cli("voices", "add", "pre1", str(clip), "--transcript", "x", env=volume)
    assert taken.returncode == 1 and "already called 'pre1'" in taken.stderr
    assert cli("voices", "rm", "pre1", env=volume).stdout.strip() == "deleted pre1"
    assert "no voices in" in cli("voices", env=volume).stdout

    one, other = workers
    remote = ["voices", "--url", one.url, "--http"]
    env = {"HIGGS_API_KEY": KEY}
    assert (
        cli(*remote, "add", "cli1", str(clip), "--transcript", "Over HTTP.", env=env).returncode
        == 0
    )
    assert "cli1\tupload" in cli("voices", "--url", other.url, "--http", env=env).stdout
    assert cli(*remote, "rm", "cli1", env=env).returncode == 0


def test_the_client_keeps_takes_on_both_servers(
    queue_server: LocalServer, workers: tuple[HttpServer, HttpServer]
) -> None:
    """Voices.keep sends take_id: the queue's voice.create, or JSON to /v1/audio/voices."""
    one, _ = workers
    queued = queue_server.runsync({"text": "Queued take.", "max_new_tokens": 30,
                                   "remember_take": True})["output"]  # fmt: skip
    body = {"model": "tts-1", "input": "HTTP take.", "max_new_tokens": 30, "remember_take": True}
    spoken = httpx.post(f"{one.url}/v1/audio/speech", headers=AUTH, json=body, timeout=120)
    for voices, take_id, text in (
        (Voices(endpoint=Endpoint(queue_server.url)), queued["take_id"], "Queued take."),
        (Voices(http_url=one.url, http_key=KEY), spoken.headers["x-take-id"], "HTTP take."),
    ):
        with voices:
            made = voices.keep("client-take", take_id, consent="Generated.")
            assert (made["source"], made["transcript"]) == ("take", text)
            with pytest.raises(ClientError, match="take_id: no take"):
                voices.keep("client-take2", take_id)
            voices.remove("client-take")


def test_the_cli_keeps_a_take_on_the_volume(tmp_path: Path) -> None:
    """`voices add NAME --take ID` with no server: the take's codes and clip, as they are."""
    volume = tmp_path / "volume"
    codes = torch.arange(24, dtype=torch.int64).reshape(12, 2)
    TakeStore(volume, 3600.0, 10, 30.0).write(
        "ab" * 16, Take(CLIP, codes, "A take.", "Calm.", "tok")
    )
    env = {"VOICES_PATH": str(volume)}
    added = cli("voices", "add", "fromtake", "--take", "ab" * 16, env=env)
    assert added.returncode == 0, added.stderr
    made = json.loads(added.stdout)
    assert (made["source"], made["transcript"], made["description"]) == ("take", "A take.", "Calm.")
    assert torch.equal(torch.load(volume / "fromtake" / "codes.pt")["codes"], codes)
    again = cli("voices", "add", "other", "--take", "ab" * 16, env=env)
    assert again.returncode == 1 and "take_id: no take" in again.stderr
    both = cli("voices", "add", "x", str(tmp_path), "--take", "ab" * 16, env=env)
    assert both.returncode == 2 and "give a clip or --take ID" in both.stderr
    bare = cli("voices", "add", "x", str(tmp_path), env=env)
    assert bare.returncode == 2 and "--transcript is required with a clip" in bare.stderr
