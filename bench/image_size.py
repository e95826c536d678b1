"""Print the sizes that decide the images' weight (no Docker engine needed).

thin: the project wheel (built offline with the build group's hatchling) installed with no
      dependencies into an empty virtual environment, plus the `uv` binary the image
      copies in: exactly the Python-side content the thin target adds to its base image.
full: the thin content plus the installed size of every distribution in requirements.lock,
      measured in this project's .venv from each distribution's RECORD (the .venv holds
      the same pinned CUDA wheels the full target installs).

Usage: python bench/image_size.py [--budget-mb N]   (exit 1 when thin is over budget)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).with_name("uv")
MB = 1024 * 1024


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def thin_bytes() -> tuple[int, int]:
    """(project installed into an empty venv, the uv binary) in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        dist, venv = Path(tmp, "dist"), Path(tmp, "venv")
        run = {"check": True, "capture_output": True, "cwd": ROOT}
        subprocess.run([UV, "build", "--wheel", "--no-build-isolation", "-o", dist,
                        "--python", sys.executable], **run)  # fmt: skip
        subprocess.run([UV, "venv", "--python", sys.executable, venv], **run)
        empty = tree_size(venv)
        wheel = next(dist.glob("*.whl"))
        subprocess.run([UV, "pip", "install", "--no-deps", "--python", venv / "bin/python",
                        wheel], **run)  # fmt: skip
        return tree_size(venv) - empty, UV.stat().st_size


def runtime_bytes() -> tuple[int, int]:
    """(installed bytes of the lock's distributions found here, how many were missing)."""
    names = re.findall(r"^([A-Za-z0-9_.-]+)==", (ROOT / "requirements.lock").read_text(), re.M)
    total, missing = 0, 0
    for name in sorted(set(names)):
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing += 1  # a platform-specific pin that does not apply here
            continue
        total += sum(f.locate().stat().st_size for f in files if Path(f.locate()).is_file())
    return total, missing


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-mb", type=float, default=100.0)
    args = parser.parse_args()
    project, uv = thin_bytes()
    thin = project + uv
    print(f"thin: project {project / MB:.2f} MB + uv {uv / MB:.1f} MB = {thin / MB:.1f} MB "
          f"on top of the python:3.11-slim base (budget {args.budget_mb:.0f} MB)")  # fmt: skip
    runtime, missing = runtime_bytes()
    print(f"full: thin + runtime {runtime / MB / 1024:.2f} GB installed "
          f"({missing} pinned distributions not installed on this platform)")  # fmt: skip
    return 0 if thin <= args.budget_mb * MB else 1


if __name__ == "__main__":
    sys.exit(main())
