"""The `higgs-runpod` command as a user runs it (a subprocess). `run_cli` is its `speak`
with a RunPod key that tests grep outputs for: tests/test_client.py runs it against a
stand-in for RunPod's cloud, tests/e2e/test_client_e2e.py against a served worker."""

from __future__ import annotations

import os
import subprocess
import sys

API_KEY = "rp_test_key_never_printed_123"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "higgs_runpod.tools.cli", "speak", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "RUNPOD_API_KEY": API_KEY, **(env or {})},
        timeout=timeout,
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "higgs_runpod.tools.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
