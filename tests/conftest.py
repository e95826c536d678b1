"""Shared fixtures: a tiny real checkpoint, settings pointing at it, and a live local server.

Everything runs on the CPU with the real transformers classes; the only network is
loopback.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import soundfile
import torch
import uvicorn

from higgs_runpod.fronts.http_api import Service, create_app
from higgs_runpod.fronts.http_guard import uvicorn_config
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.weights.tiny import make_tiny_model
from higgs_runpod.weights.tiny_published import make_published_layout_model
from hub_server import HubServer, host_directory
from s3store import AuthStore, StrictStore


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MODEL_PATH, TOKENIZER_PATH) of a tiny random checkpoint built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def published_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MODEL_PATH, TOKENIZER_PATH) of a tiny checkpoint in the published checkpoint's layout
    (real token ids, 8 codebooks of 1024 codes), built once per session."""
    return make_published_layout_model(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A voice library with one preset, `alice`."""
    directory = tmp_path_factory.mktemp("voices")
    (directory / "alice.wav").write_bytes(make_wav(seconds=1.5))
    (directory / "alice.txt").write_text("Hello, I am Alice.\n")
    return directory


@pytest.fixture(scope="session")
def base_env(tiny_checkpoint: tuple[Path, Path], voices_dir: Path) -> dict[str, str]:
    model_path, tokenizer_path = tiny_checkpoint
    return {
        "MODEL_PATH": str(model_path),
        "TOKENIZER_PATH": str(tokenizer_path),
        "VOICES_PATH": str(voices_dir),
        "DEVICE": "cpu",
    }


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return load_settings(base_env)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Engine:
    engine = Engine(settings)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def worker(settings: Settings, engine: Engine) -> Worker:
    return Worker(settings, engine)


class EncodeSpy:
    """Counts the audio tokenizer's encodes, delegating to the engine's real encoder."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = engine.encode_clip

        def spy(samples: np.ndarray) -> torch.Tensor:
            self.calls += 1
            return real(samples)

        monkeypatch.setattr(engine, "encode_clip", spy)


def make_wav(seconds: float = 1.0, sample_rate: int = 24_000, freq: float = 220.0) -> bytes:
    """A sine tone as 16-bit WAV bytes."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    buffer = io.BytesIO()
    soundfile.write(buffer, 0.3 * np.sin(2 * np.pi * freq * t), sample_rate, format="WAV")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded(data: bytes, audio_format: str, rate: int) -> np.ndarray:
    """16-bit samples as FFmpeg decodes them (pcm is raw, so read it as such)."""
    if audio_format == "pcm":
        return np.frombuffer(data, "<i2")
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        frames = [*container.decode(audio=0), None]  # None flushes the resampler
        out = [f.to_ndarray().reshape(-1) for fr in frames for f in resampler.resample(fr)]
    return np.concatenate(out) if out else np.zeros(0, "<i2")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server in a subprocess on a free loopback port, its output in a log file."""

    ready_path = "/"

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def is_ready(self) -> bool:
        return httpx.get(f"{self.url}{self.ready_path}", timeout=1.0).status_code < 500

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()}")
            try:
                if self.is_ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class ThreadServer:
    """`create_app` under uvicorn with the CLI's config, on a free loopback port."""

    def __init__(self, settings: Settings, worker: Worker) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, worker)
        self.server = uvicorn.Server(uvicorn_config(self.app, settings, "127.0.0.1", self.port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    @property
    def service(self) -> Service:
        return self.app.app.state.service

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class LocalServer(ServerProcess):
    """`higgs-runpod serve` in a subprocess: RunPod's real local API server."""

    ready_path = "/docs"

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        port = free_port()
        args = ["-m", "higgs_runpod.tools.cli", "serve", "--port", str(port)]
        super().__init__(args, env, log_path, port)

    def runsync(self, job_input: dict, timeout: float = 120.0) -> dict:
        response = httpx.post(f"{self.url}/runsync", json={"input": job_input}, timeout=timeout)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="session")
def local_server(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A worker serving the tiny model on loopback; http and private URLs allowed for tests."""
    env = {**base_env, "ALLOW_HTTP_AUDIO_URLS": "1", "ALLOW_PRIVATE_AUDIO_URLS": "1"}
    server = LocalServer(env, tmp_path_factory.mktemp("server") / "server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def streaming_server(
    base_env: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    server = LocalServer(
        {**base_env, "ENABLE_STREAMING": "1"}, tmp_path_factory.mktemp("stream") / "server.log"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# --- S3: moto on loopback, and a worker that uploads to it ----------------------

# Distinctive fake credentials: tests grep outputs and logs for them.
S3_KEY_ID = "AKIATESTKEYID7Q2X9Z"
S3_SECRET = "sEcReT-do-not-print-4f9a1c"


@pytest.fixture(scope="session")
def s3_store() -> Iterator[StrictStore]:
    """moto's S3 refusing the newer checksums, with bucket `audio` (any key may write)."""
    store = StrictStore()
    store.client().create_bucket(Bucket="audio")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def auth_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStore]:
    """moto with authentication on, bucket `private`, one valid key pair."""
    store = AuthStore(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def s3_env(s3_store: StrictStore) -> dict[str, str]:
    """The S3 settings of a worker writing to `s3_store`'s bucket `audio`."""
    return {
        "S3_BUCKET": "audio",
        "S3_ENDPOINT_URL": s3_store.url,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_URL_EXPIRES": "600",
    }


@pytest.fixture(scope="session")
def s3_server(
    base_env: dict[str, str], s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """`higgs-runpod serve` on loopback with S3 output configured."""
    server = LocalServer({**base_env, **s3_env}, tmp_path_factory.mktemp("s3server") / "log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def no_hub_side_requests() -> Iterator[None]:
    """huggingface_hub fetches an "agent harness" list from the endpoint it read at import (the
    real hub) when it builds request headers, unless telemetry is off: tests stay on loopback."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield


@pytest.fixture
def tiny_hub(tiny_checkpoint: tuple[Path, Path]) -> Iterator[HubServer]:
    """The tiny checkpoint, served under the default repo ids by a hub-protocol server."""
    model_path, tokenizer_path = tiny_checkpoint
    settings = load_settings({})
    repos = [
        host_directory(settings.model_repo, model_path),
        host_directory(settings.tokenizer_repo, tokenizer_path),
    ]
    with HubServer(repos) as hub:
        yield hub
