"""Time the bootstrap on a reuse start: the runtime is already complete on the volume.

Two figures:
- The bootstrap's own cost (interpreter start, environment report, marker and manifest
  check, exec), with a stand-in runtime of one file for the real requirements.lock and
  `true` as the command exec'd.
- What verifying a real runtime costs: the manifest of a full tree (by default the
  site-packages of the running interpreter, which holds torch, transformers and the rest
  of the lock file) is built once, then the tree is verified against it `--runs` times.
  Runs after the first read from the page cache; a cold start reads from the network
  volume instead, so divide the bytes by the volume's read rate for that figure.

Usage: python bench/bootstrap_reuse.py [--runs N] [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from higgs_runpod.container import runtime_manifest
from higgs_runpod.container.bootstrap import MARKER, runtime_key

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tree", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    args = parser.parse_args()
    reuse_start(args.runs)
    verification(args.tree, max(1, args.runs // 3))
    return 0


def reuse_start(runs: int) -> None:
    requirements = ROOT / "requirements.lock"
    with tempfile.TemporaryDirectory() as volume:
        runtime = Path(volume, "higgs-runpod", "runtimes", runtime_key(requirements))
        runtime.mkdir(parents=True)
        (runtime / "module.py").write_text("")
        files = runtime_manifest.build(runtime, MARKER)
        (runtime / MARKER).write_text(json.dumps({"files": files}))
        env = {"PATH": os.environ["PATH"], "VOLUME_PATH": volume,
               "RUNTIME_REQUIREMENTS": str(requirements), "RUNTIME_UV": "/nonexistent"}  # fmt: skip
        walls, own = [], []
        for _ in range(runs):
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "higgs_runpod.container.bootstrap", "--", "true"],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            walls.append(time.perf_counter() - started)
            assert "reusing the runtime" in done.stderr, done.stderr
            own.append(float(re.search(r"ready in ([\d.]+) s", done.stderr)[1]))
    print(f"bootstrap reuse start, {runs} runs: wall (process start to exec'd command "
          f"exit) median {statistics.median(walls) * 1000:.0f} ms, "
          f"max {max(walls) * 1000:.0f} ms; own work (reported 'ready in') median "
          f"{statistics.median(own) * 1000:.0f} ms")  # fmt: skip


def verification(tree: Path, runs: int) -> None:
    started = time.perf_counter()
    files = runtime_manifest.build(tree, MARKER)
    built = time.perf_counter() - started
    size = sum(size for size, _ in files.values())
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        problems = runtime_manifest.problems(tree, files, MARKER)
        times.append(time.perf_counter() - started)
        assert not problems, problems
    print(f"runtime verification of {tree}: {len(files)} files, {size / 1e9:.2f} GB, "
          f"{runtime_manifest.HASH_THREADS} threads; manifest built in {built:.1f} s; "
          f"verified {runs}x: median {statistics.median(times):.2f} s "
          f"({size / 1e9 / statistics.median(times):.2f} GB/s), "
          f"first {times[0]:.2f} s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
