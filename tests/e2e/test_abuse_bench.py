"""bench/abuse.py stays runnable: its case list builds, and its quick HTTP run passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRANSPORT = ("drip-body", "normal-during-drip", "drip-flood-6", "drip-headers", "idle-connection",
             "bracket-bomb", "text-plain", "form-urlencoded", "no-content-type", "no-key",
             "wrong-key", "oversized-declared", "oversized-chunked")  # fmt: skip


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, ROOT / "bench/abuse.py", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},  # its helpers: see its docstring
    )  # fmt: skip


def test_dry_run_lists_the_cases() -> None:
    result = bench("--dry-run", "--quick", timeout=120)
    assert result.returncode == 0, result.stderr
    http = next(line for line in result.stdout.splitlines() if line.startswith("http: "))
    assert http.removeprefix("http: ").split(", ")[: len(TRANSPORT)] == list(TRANSPORT)


def test_quick_run_against_the_http_server(tiny_checkpoint: tuple[Path, Path]) -> None:
    model, tokenizer = map(str, tiny_checkpoint)
    args = ("--quick", "--front", "http", "--cases", "transport", "--checkpoint", model, tokenizer)
    result = bench(*args, timeout=280)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.split()}
    for case in TRANSPORT:  # columns: case, answer..., ok, seconds, peak growth, serving
        *_, ok, seconds, _, serving = rows[case].split()
        assert ok == "ok", rows[case]
        assert float(seconds) < 10, rows[case]
        assert serving == "yes", rows[case]  # the server still answered after the case
    assert "0 case(s) not answered as wanted" in result.stdout
