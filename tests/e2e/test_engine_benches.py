"""The engine's benchmark scripts stay runnable: their quick modes run and print figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench(script: str, *args: str, timeout: float) -> str:
    result = subprocess.run(
        [sys.executable, ROOT / "bench" / script, *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_throughput_dry_run_prints_a_row_per_batch_size() -> None:
    out = bench("throughput.py", "--dry-run", timeout=240)
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+\d+$", out, re.M)
    assert [int(r[0]) for r in rows] == [1, 2], out
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows), out
    assert re.search(r"measured/floor = [\d.]+", out), out


def test_engine_mixed_quick_run_prints_every_figure() -> None:
    out = bench("engine_mixed.py", "--quick", timeout=280)
    for pattern in (r"one at a time .* p50 .* p95", r"as they arrive .* p50 .* p95",
                    r"speed-up: [\d.]+x", r"short during long: .*% of it",
                    r"HTTP, 3 requests: .*: [\d.]+x"):  # fmt: skip
        assert re.search(pattern, out), (pattern, out)
