"""bench/first_audio.py stays runnable: its cells list, and its quick run prints a table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CELLS = ["http/wav", "http/mp3", "http/opus", "websocket/wav", "websocket/mp3", "websocket/opus"]


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, ROOT / "bench/first_audio.py", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


def test_dry_run_lists_the_cells() -> None:
    result = bench("--dry-run", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["cells: " + ", ".join(CELLS)]


def test_quick_run_prints_a_figure_per_cell(tiny_checkpoint: tuple[Path, Path]) -> None:
    result = bench("--quick", "--checkpoint", *map(str, tiny_checkpoint), timeout=280)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    table = {
        f"{row[0]}/{row[1]}": row[2:] for row in rows if row and row[0] in ("http", "websocket")
    }
    assert sorted(table) == sorted(CELLS)
    for cell, (single, p50, p95, _) in table.items():
        assert 0 < float(single) < 10_000 and 0 < float(p50) <= float(p95), cell
