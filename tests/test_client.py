"""The client: job following against RunPod's cloud job API (tests/e2e/test_client_e2e.py
runs it against a live `higgs-runpod serve`).

RunPod's cloud cannot run here, so `FakeRunPod` plays it on loopback: `/run`,
`GET /status/{id}`, `POST /cancel/{id}`, `/health`, with scripted job states and 429s.
Everything else is real: the client's HTTP and the CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from higgs_runpod.errors import ClientError, JobFailed
from higgs_runpod.tools.client import Endpoint, JobUpdate, save_audio
from support.audio import b64, make_wav
from support.cli import API_KEY, run_cli

WAV = make_wav(seconds=0.5)


class FakeRunPod:
    """RunPod's cloud job API on loopback; `script` is the status sequence of the one job."""

    def __init__(
        self,
        script: list[dict[str, Any]],
        *,
        run_429: int = 0,
        status_429: int = 0,
        key: str | None = API_KEY,
    ):
        """`key`: the Bearer key every call must carry (None: any call is let in)."""
        self.script = list(script)
        self.key = key
        self.run_429 = run_429
        self.status_429 = status_429
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.cancelled = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        serve = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        serve.start()

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _, _ in self.calls if method in (None, m)]

    def handle(self, request: BaseHTTPRequestHandler, method: str) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length)) if length else None
        self.calls.append((method, request.path, dict(request.headers), body))
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return self.reply(request, 401, {"error": "Unauthorized"})
        path = request.path
        if path == "/audio.wav":
            return self.reply(request, 200, WAV, "audio/wav")
        if (method, path) == ("POST", "/run"):
            if self.run_429 > 0:
                self.run_429 -= 1
                return self.reply(request, 429, {"error": "rate"}, retry_after="0.05")
            return self.reply(request, 200, {"id": "job-1", "status": "IN_QUEUE"})
        if (method, path) == ("GET", "/status/job-1"):
            if self.status_429 > 0:
                self.status_429 -= 1
                return self.reply(request, 429, {"error": "rate"}, retry_after="0.05")
            if self.cancelled:
                return self.reply(request, 200, {"id": "job-1", "status": "CANCELLED"})
            state = self.script.pop(0) if len(self.script) > 1 else self.script[0]
            return self.reply(request, 200, {"id": "job-1", **state})
        if (method, path) == ("POST", "/cancel/job-1"):
            self.cancelled = True
            return self.reply(request, 200, {"id": "job-1", "status": "CANCELLED"})
        if (method, path) == ("GET", "/health"):
            return self.reply(request, 200, {"jobs": {"inQueue": 3, "inProgress": 1}})
        return self.reply(request, 405 if path.startswith("/status") else 404, {})

    @staticmethod
    def reply(
        request: BaseHTTPRequestHandler,
        code: int,
        body: Any,
        content_type: str = "application/json",
        retry_after: str | None = None,
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request.send_response(code)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        if retry_after:
            request.send_header("Retry-After", retry_after)
        request.end_headers()
        request.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def fake_factory() -> Iterator[Any]:
    fakes: list[FakeRunPod] = []

    def make(script: list[dict[str, Any]], **options: Any) -> FakeRunPod:
        fakes.append(FakeRunPod(script, **options))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.stop()


def endpoint(fake: FakeRunPod, **options: Any) -> Endpoint:
    """A client of the fake, sending it the key as it would send RunPod's API."""
    return Endpoint(
        fake.url, API_KEY, poll_s=0.01, max_poll_s=0.05, send_key_to_any_host=True, **options
    )


COMPLETED = {"status": "COMPLETED", "output": {"audio_base64": b64(WAV), "format": "wav"}}


def test_follows_the_job_through_its_states(fake_factory: Any, tmp_path: Path) -> None:
    fake = fake_factory(
        [
            {"status": "IN_QUEUE"},
            {"status": "IN_PROGRESS"},
            {"status": "IN_PROGRESS", "output": "chunk 1 of 2"},
            COMPLETED,
        ]
    )
    updates: list[JobUpdate] = []
    with endpoint(fake) as client:
        output = client.run({"text": "hi"}, on_update=updates.append)

    assert [u.status for u in updates] == ["IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS", "COMPLETED"]
    assert updates[0].queued == 3
    assert updates[2].progress == "chunk 1 of 2"
    assert fake.calls[0][3] == {"input": {"text": "hi"}}
    assert fake.paths("GET").count("/status/job-1") == 4
    assert all(headers["Authorization"] == f"Bearer {API_KEY}" for _, _, headers, _ in fake.calls)
    assert save_audio(output, tmp_path / "out.wav") == len(WAV)
    assert (tmp_path / "out.wav").read_bytes() == WAV


def test_s3config_travels_beside_input(fake_factory: Any) -> None:
    fake = fake_factory([COMPLETED])
    s3_config = {"accessId": "a", "accessSecret": "b", "bucketName": "c"}
    with endpoint(fake) as client:
        client.run({"text": "hi"}, s3_config=s3_config)
    assert fake.calls[0][3] == {"input": {"text": "hi"}, "s3Config": s3_config}


def test_429_is_retried_after_the_servers_delay(fake_factory: Any) -> None:
    fake = fake_factory([COMPLETED], run_429=2, status_429=2)
    with endpoint(fake) as client:
        assert client.run({"text": "hi"})["format"] == "wav"
    assert fake.paths("POST").count("/run") == 3
    assert fake.paths("GET").count("/status/job-1") == 3


def test_429_past_the_wait_budget_gives_up(fake_factory: Any) -> None:
    fake = fake_factory([COMPLETED], run_429=1000)
    with endpoint(fake, max_wait_s=0.3) as client, pytest.raises(ClientError, match="HTTP 429"):
        client.run({"text": "hi"})


@pytest.mark.parametrize(
    ("state", "message"),
    [({"status": "FAILED", "error": "text: is required"}, "job job-1 FAILED: text: is required"),
     ({"status": "TIMED_OUT"}, "job job-1 TIMED_OUT: the job ran past the endpoint's execution"),
     ({"status": "CANCELLED"}, "job job-1 CANCELLED: the job was cancelled")],
)  # fmt: skip
def test_terminal_failures_raise_with_the_workers_message(
    fake_factory: Any, state: dict, message: str
) -> None:
    fake = fake_factory([{"status": "IN_PROGRESS"}, state])
    with endpoint(fake) as client, pytest.raises(JobFailed) as error:
        client.run({"text": "hi"})
    assert str(error.value).startswith(message)
    assert error.value.status == state["status"]


def test_wait_is_bounded_and_cancels_the_job(fake_factory: Any) -> None:
    fake = fake_factory([{"status": "IN_PROGRESS"}])
    started = time.monotonic()
    with endpoint(fake, max_wait_s=0.4) as client, pytest.raises(JobFailed) as error:
        client.run({"text": "hi"})
    assert time.monotonic() - started < 3
    assert error.value.status == "CLIENT_TIMEOUT"
    assert "the job was cancelled" in error.value.message
    assert "/cancel/job-1" in fake.paths("POST")


def test_wrong_api_key_is_a_clear_error(fake_factory: Any) -> None:
    fake = fake_factory([COMPLETED])
    client = Endpoint(fake.url, "wrong-key", poll_s=0.01, send_key_to_any_host=True)
    with client, pytest.raises(ClientError) as error:
        client.run({"text": "hi"})
    assert "HTTP 401" in str(error.value)
    assert "RUNPOD_API_KEY" in str(error.value)
    assert "wrong-key" not in str(error.value)


def test_unreachable_endpoint_is_a_clear_error() -> None:
    from support.servers import free_port

    with (
        Endpoint(f"http://127.0.0.1:{free_port()}", API_KEY, max_wait_s=0.2, poll_s=0.05) as c,
        pytest.raises(ClientError, match="cannot reach"),
    ):
        c.run({"text": "hi"})


def test_download_sends_no_api_key_and_leaves_no_partial_file(
    fake_factory: Any, tmp_path: Path
) -> None:
    fake = fake_factory([COMPLETED])
    # The fake wants the API key on every call; a presigned URL carries its own auth.
    # save_audio must not send the endpoint's key to the bucket, so this download fails.
    with pytest.raises(ClientError, match="HTTP 401") as error:
        save_audio({"audio_url": f"{fake.url}/audio.wav", "s3_uri": "s3://b/k"}, tmp_path / "x")
    assert "s3://b/k" in str(error.value)
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_cli_prints_the_workers_error_and_exits_non_zero(fake_factory: Any, tmp_path: Path) -> None:
    fake = fake_factory([{"status": "FAILED", "error": "voice: unknown preset 'bob'"}], key=None)
    result = run_cli("hi", "-o", str(tmp_path / "x.wav"), "--url", fake.url)
    assert result.returncode == 1
    assert "job job-1 FAILED: voice: unknown preset 'bob'" in result.stderr
    assert API_KEY not in result.stderr + result.stdout
    assert not (tmp_path / "x.wav").exists()


def test_cli_ctrl_c_cancels_the_job(fake_factory: Any, tmp_path: Path) -> None:
    fake = fake_factory([{"status": "IN_PROGRESS"}], key=None)
    process = subprocess.Popen(
        [sys.executable, "-m", "higgs_runpod.tools.cli", "speak", "hi", "-o", str(tmp_path / "x.wav"),
         "--url", fake.url],
        env={**os.environ, "RUNPOD_API_KEY": API_KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while "/status/job-1" not in fake.paths("GET") and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert "interrupted: job job-1 was cancelled" in stderr
    assert "/cancel/job-1" in fake.paths("POST")
    assert API_KEY not in stdout + stderr


def test_cli_sends_the_runpod_key_only_to_runpods_api(fake_factory: Any, tmp_path: Path) -> None:
    """`--url` may be anyone's server, and plain http: RUNPOD_API_KEY stays home."""
    fake = fake_factory([COMPLETED], key=None)
    result = run_cli("hi", "-o", str(tmp_path / "x.wav"), "--url", fake.url)
    assert result.returncode == 0, result.stderr
    assert "RUNPOD_API_KEY is not sent to this URL" in result.stderr
    assert fake.calls and all("Authorization" not in headers for _, _, headers, _ in fake.calls)
    assert all(API_KEY not in json.dumps([h, b]) for _, _, h, b in fake.calls)


@pytest.mark.parametrize(
    ("url", "sent"),
    [("https://api.runpod.ai/v2/abc", True), ("https://abc123.api.runpod.ai", True),
     ("https://api.runpod.io/v2", True), ("http://api.runpod.ai/v2/abc", False),
     ("https://api.runpod.ai.evil.example/v2", False), ("https://evilapi.runpod.ai", False),
     ("https://example.com/api.runpod.ai", False), ("http://127.0.0.1:8000", False)],
)  # fmt: skip
def test_the_key_goes_only_to_runpods_api_hosts(url: str, sent: bool) -> None:
    with Endpoint(url, API_KEY) as client:
        assert client.sends_key is sent
        assert ("authorization" in client._http.headers) is sent


def test_cli_needs_an_api_key_for_an_endpoint_id(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNPOD_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "higgs_runpod.tools.cli", "speak", "hi", "-o", str(tmp_path / "x.wav"),
         "--endpoint", "abc"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "RUNPOD_API_KEY" in result.stderr
