"""Our servers on free loopback ports: `higgs-runpod serve` or `http` in a subprocess, or
the HTTP app under uvicorn in a thread of the test process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx
import uvicorn
from starlette.types import ASGIApp

from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.fronts.http_guard import uvicorn_config
from higgs_runpod.fronts.http_state import Service
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings

Started = TypeVar("Started", bound="ServerProcess")


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
        stop_process(self.process)
        self._log.close()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate, and kill what does not exit within 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


@contextmanager
def serving(server: Started) -> Iterator[Started]:
    """`server` once it is ready; stopped afterwards, also when it never got ready."""
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class ThreadServer:
    """`create_app` under uvicorn with the CLI's config, on a free loopback port."""

    def __init__(
        self,
        settings: Settings,
        speech: SpeechService,
        middleware: Callable[[ASGIApp], ASGIApp] | None = None,
    ) -> None:
        """`middleware` wraps the app as uvicorn serves it (a test's view of what goes out)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings, speech)
        served = middleware(self.app) if middleware is not None else self.app
        self.server = uvicorn.Server(uvicorn_config(served, settings, "127.0.0.1", self.port))
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


class HttpServer(ServerProcess):
    """`higgs-runpod start` with WORKER_MODE=http: ready when /ping answers 200."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        port = free_port()
        self.auth = {"Authorization": f"Bearer {env.get('HIGGS_API_KEY', '')}"}
        env = {**env, "WORKER_MODE": "http", "HTTP_HOST": "127.0.0.1", "PORT": str(port)}
        super().__init__(["-m", "higgs_runpod.tools.cli", "start"], env, log_path, port)

    def is_ready(self) -> bool:
        return httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 200

    def metric(self, name: str) -> float:
        """A metric's value, read with the key the server was started with."""
        text = httpx.get(f"{self.url}/metrics", headers=self.auth).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)


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
