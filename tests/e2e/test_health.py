"""The image's health check against a real worker: `higgs-runpod serve` on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from higgs_runpod.container.health import check, mark_ready
from support.servers import LocalServer


def health(ready_file: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "READY_FILE": str(ready_file)}
    command = [sys.executable, "-m", "higgs_runpod.container.health"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)


def test_healthy_only_while_the_worker_that_loaded_the_model_lives(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    ready_file = tmp_path / "ready.json"
    assert health(ready_file).returncode == 1, "nothing has loaded yet"
    server = LocalServer({**base_env, "READY_FILE": str(ready_file)}, tmp_path / "server.log")
    try:
        server.wait_ready()
        done = health(ready_file)
        assert done.returncode == 0 and done.stdout.strip() == "healthy", done.stdout
    finally:
        server.stop()
    done = health(ready_file)
    assert done.returncode == 1 and "is gone" in done.stdout


def test_unreadable_or_foreign_ready_files_are_unhealthy(tmp_path: Path) -> None:
    path = tmp_path / "ready.json"
    path.write_text("not json")
    assert "not ready" in (check(path) or "")
    mark_ready(path)
    assert check(path) is None  # this very process is alive
