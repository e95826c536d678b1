"""Time the bootstrap on a reuse start: the runtime is already complete on the volume.

A reuse start never touches the installed packages (it checks the marker, then execs the
worker), so a complete runtime is stood in for by a directory holding only the marker
for the real requirements.lock. The command exec'd is `true`, so the figure is the
bootstrap's own cost: interpreter start, environment report, marker check, exec.

Usage: python bench/bootstrap_reuse.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from higgs_runpod.bootstrap import MARKER, runtime_key

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    requirements = ROOT / "requirements.lock"
    with tempfile.TemporaryDirectory() as volume:
        runtime = Path(volume, "higgs-runpod", "runtimes", runtime_key(requirements))
        runtime.mkdir(parents=True)
        (runtime / MARKER).write_text("{}")
        env = {"PATH": os.environ["PATH"], "VOLUME_PATH": volume,
               "RUNTIME_REQUIREMENTS": str(requirements), "RUNTIME_UV": "/nonexistent"}  # fmt: skip
        walls, own = [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "higgs_runpod.bootstrap", "--", "true"],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            walls.append(time.perf_counter() - started)
            assert "reusing the runtime" in done.stderr, done.stderr
            own.append(float(re.search(r"ready in ([\d.]+) s", done.stderr)[1]))
    print(f"bootstrap reuse start, {args.runs} runs: wall (process start to exec'd command "
          f"exit) median {statistics.median(walls) * 1000:.0f} ms, "
          f"max {max(walls) * 1000:.0f} ms; own work (reported 'ready in') median "
          f"{statistics.median(own) * 1000:.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
