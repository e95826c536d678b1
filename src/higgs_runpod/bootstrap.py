"""The container's command: check the environment, bring in the runtime once, start the worker.

The thin image holds Python, the project and `uv`, but not torch & co. Its runtime (the
hash-pinned `requirements.lock` exported from `uv.lock`) is installed on the network
volume, once per lock file, and reused by every later start without network access:

- Key: the sha256 of the lock file plus the Python version and machine, so a changed lock
  or a different interpreter gets a new directory and never a half-matching one.
- Install: under a `VolumeLock` (one installer across all workers; the others wait), into
  a private staging directory beside the target, with `uv pip install --target
  --require-hashes --no-deps`. Then `publish_directory` writes the completion marker last
  and renames the staging directory to `<runtimes>/<key>` in one step.
- Why `--target` and not a venv: a venv is not relocatable (its scripts carry absolute
  shebangs, `pyvenv.cfg` names its home), so it could not be built under a staging name
  and renamed into place. A `--target` directory is plain `site-packages` content, nothing
  in it names its own path, so the rename is safe. The worker runs on the image's own
  interpreter with that directory first on `PYTHONPATH` (`.pth` files in it are not
  processed; nothing the worker imports needs one).
- Trust: only a directory that carries the marker is used. A failed or killed install
  leaves a staging directory (removed by the next installer under the lock) and never a
  marker, so the next start installs again.
- No volume: a container-local directory is used instead, with a warning (the install
  then happens on every cold start of that container).

This module runs before the runtime exists: standard library only (and `volume_lock`).
Configuration comes from environment variables, read in `load_config`; see
`docs/issue-4.md` for each one.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .volume_lock import VolumeLock, publish_directory, remove_tree

MARKER = ".higgs-runtime-complete.json"
WORKER_COMMAND = ("-m", "higgs_runpod.cli", "start")  # queue or HTTP, by WORKER_MODE
MODES = ("volume", "image")
LOW_SPACE_BYTES = 10 * 1024**3  # the CUDA runtime alone takes about 5 GB


class BootstrapError(Exception):
    """A setting is missing or wrong, or the runtime could not be installed."""


@dataclass(frozen=True)
class Config:
    mode: str  # "volume": install the runtime at start; "image": it is baked into the image
    requirements: Path | None
    volume: Path
    runtime_dir: Path
    local_runtime_dir: Path
    lock_wait_s: float
    uv: str


def load_config(env: Mapping[str, str]) -> Config:
    """Read the bootstrap's settings from `env`; raise `BootstrapError` naming the variable."""
    mode = env.get("RUNTIME_MODE", "volume")
    if mode not in MODES:
        raise BootstrapError(f"RUNTIME_MODE must be one of {', '.join(MODES)}, not {mode!r}")
    requirements = None
    if mode == "volume":
        if not env.get("RUNTIME_REQUIREMENTS"):
            raise BootstrapError(
                "RUNTIME_REQUIREMENTS is not set: it must name the hash-pinned requirements "
                "file exported from uv.lock (the image sets /app/requirements.lock)"
            )
        requirements = Path(env["RUNTIME_REQUIREMENTS"])
        if not requirements.is_file():
            raise BootstrapError(f"RUNTIME_REQUIREMENTS: {requirements} is not a file")
    volume = Path(env.get("VOLUME_PATH", "/runpod-volume"))
    try:
        lock_wait_s = float(env.get("RUNTIME_LOCK_WAIT_S", "1800"))
    except ValueError:
        raise BootstrapError("RUNTIME_LOCK_WAIT_S must be a number of seconds") from None
    return Config(
        mode=mode,
        requirements=requirements,
        volume=volume,
        runtime_dir=Path(env.get("RUNTIME_DIR", str(volume / "higgs-runpod" / "runtimes"))),
        local_runtime_dir=Path(env.get("RUNTIME_LOCAL_DIR", "/tmp/higgs-runpod/runtimes")),
        lock_wait_s=lock_wait_s,
        uv=env.get("RUNTIME_UV", "uv"),
    )


def say(message: str) -> None:
    """Bootstrap output goes to stderr, line by line, so RunPod's log shows it at once."""
    print(f"[bootstrap] {message}", file=sys.stderr, flush=True)  # noqa: T201


def runtime_key(requirements: Path) -> str:
    """Names the runtime: lock file content, Python version and machine (16 hex digits)."""
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"|{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}".encode())
    digest.update(f"|{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def is_complete(runtime: Path) -> bool:
    return (runtime / MARKER).is_file()


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def report_environment(config: Config, env: Mapping[str, str]) -> None:
    """Print what a failed start is usually about: paths, GPU, volume, free space."""
    say(f"python {sys.version.split()[0]} at {sys.executable}, runtime mode {config.mode}")
    for name in ("MODEL_PATH", "TOKENIZER_PATH", "VOICES_PATH"):
        if name in env:
            state = "present" if Path(env[name]).exists() else "missing"
            say(f"{name}={env[name]} ({state})")
    gpus = sorted(str(p.name) for p in Path("/dev").glob("nvidia[0-9]*"))
    say(f"GPU devices: {', '.join(gpus) if gpus else 'none visible'}")
    if config.volume.is_dir():
        writable = "writable" if _writable(config.volume) else "NOT writable"
        free = shutil.disk_usage(config.volume).free
        say(f"volume {config.volume}: mounted, {writable}, {free / 1024**3:.1f} GiB free")
        if free < LOW_SPACE_BYTES:
            say(f"WARNING: under {LOW_SPACE_BYTES // 1024**3} GiB free on {config.volume}")
    else:
        say(f"volume {config.volume}: not mounted")


def choose_runtime_root(config: Config) -> Path:
    """The network volume when mounted and writable, else container-local with a warning."""
    if _writable(config.volume):
        return config.runtime_dir
    say(
        f"WARNING: no writable volume at {config.volume}; installing the runtime into "
        f"{config.local_runtime_dir} inside the container. Every cold start will download "
        "it again: attach a network volume (or use the -full image) to avoid that."
    )
    return config.local_runtime_dir


def install(config: Config, staging: Path) -> None:
    """Install the lock file's packages into `staging` (hash-checked, no resolution)."""
    assert config.requirements is not None
    command = [
        config.uv, "pip", "install",
        "--python", sys.executable,
        "--target", str(staging),
        "--require-hashes", "--no-deps",
        "--link-mode", "copy",  # the image sets UV_NO_CACHE: no second copy on disk
        "--compile-bytecode",
        "--requirement", str(config.requirements),
    ]  # fmt: skip
    say(f"installing the runtime into {staging} ...")
    started = time.monotonic()
    try:
        done = subprocess.run(command, stdout=sys.stderr, check=False)
    except FileNotFoundError:
        raise BootstrapError(f"RUNTIME_UV: {config.uv!r} is not an executable") from None
    if done.returncode != 0:
        raise BootstrapError(f"installing the runtime failed (uv exit code {done.returncode})")
    say(f"installed in {time.monotonic() - started:.1f} s")


def ensure_runtime(config: Config) -> Path:
    """Return a complete runtime directory for this lock file, installing it at most once."""
    assert config.requirements is not None
    root = choose_runtime_root(config)
    key = runtime_key(config.requirements)
    runtime = root / key
    if is_complete(runtime):
        say(f"reusing the runtime {runtime}")
        return runtime
    root.mkdir(parents=True, exist_ok=True)
    with VolumeLock(root / f"{key}.lock", wait_timeout_s=config.lock_wait_s, on_wait=say):
        if is_complete(runtime):  # another worker installed it while this one waited
            say(f"reusing the runtime {runtime}, installed by another worker")
            return runtime
        for leftover in [runtime, *root.glob(f".staging-{key}-*")]:
            if leftover.exists():  # an earlier install that did not finish: never trusted
                say(f"removing the unfinished {leftover}")
                remove_tree(leftover)
        staging = root / f".staging-{key}-{uuid.uuid4().hex[:8]}"
        try:
            install(config, staging)
            marker = {"key": key, "python": sys.version.split()[0], "installed_at": time.time()}
            publish_directory(staging, runtime, MARKER, marker)
        finally:
            if staging.exists():
                remove_tree(staging)
    say(f"runtime ready at {runtime}")
    return runtime


def worker_env(env: Mapping[str, str], runtime: Path | None) -> dict[str, str]:
    out = dict(env)
    if runtime is not None:
        out["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(runtime), env.get("PYTHONPATH", "")) if p
        )
    return out


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m higgs_runpod.bootstrap [-- COMMAND...]`: prepare, then exec the worker."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    command = args[1:] if args[:1] == ["--"] else [sys.executable, *WORKER_COMMAND]
    started = time.monotonic()
    try:
        config = load_config(env)
        report_environment(config, env)
        runtime = ensure_runtime(config) if config.mode == "volume" else None
    except (BootstrapError, TimeoutError, OSError) as exc:
        say(f"ERROR: {exc}")
        return 2
    say(f"ready in {time.monotonic() - started:.2f} s; starting: {' '.join(command)}")
    os.execvpe(command[0], command, worker_env(env, runtime))
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
