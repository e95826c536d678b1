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
- Trust: the marker is written last and carries a manifest of every installed file (size
  and SHA-256, see `runtime_manifest`). Before each use the tree is checked against it;
  a runtime without a marker, or one that differs from its manifest (a file changed, or
  an unlisted `sitecustomize.py`, `.pth`, `.py` or `.so` added), is never used: the start
  says so in one line and installs it again. A failed or killed install leaves a staging
  directory (removed by the next installer under the lock) and never a marker.
- Races: each installer stages into a directory named for it alone (host, pid, random),
  and checks that it still holds the lock right before publishing: one that stalled so
  long that another start took the lock over gives up instead of replacing that start's
  runtime. The worker runs with `PYTHONDONTWRITEBYTECODE`, so it never adds files there.
- No volume: a container-local directory is used instead, with a warning (the install
  then happens on every cold start of that container).

This module runs before the runtime exists: standard library only, like the rest of
`higgs_runpod.container` (`volume_lock`, `runtime_manifest`), the only modules it imports.
Configuration comes from environment variables, read in `load_config`; see
README's configuration table (bootstrap part) for each one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from higgs_runpod.container import runtime_manifest
from higgs_runpod.container.volume_lock import (
    VolumeLock,
    owner_sibling,
    publish_directory,
    remove_tree,
)

MARKER = ".higgs-runtime-complete.json"
DEFAULT_VOLUME_PATH = "/runpod-volume"  # RunPod's mount point; settings.Settings uses it too
WORKER_COMMAND = ("-m", "higgs_runpod.tools.cli", "start")  # queue or HTTP, by WORKER_MODE
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
    lock_stale_s: float
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
    volume = Path(env.get("VOLUME_PATH", DEFAULT_VOLUME_PATH))
    lock_wait_s = _seconds(env, "RUNTIME_LOCK_WAIT_S", "1800")
    lock_stale_s = _seconds(env, "RUNTIME_LOCK_STALE_S", "60")
    return Config(
        mode=mode,
        requirements=requirements,
        volume=volume,
        runtime_dir=Path(env.get("RUNTIME_DIR", str(volume / "higgs-runpod" / "runtimes"))),
        local_runtime_dir=Path(env.get("RUNTIME_LOCAL_DIR", "/tmp/higgs-runpod/runtimes")),
        lock_wait_s=lock_wait_s,
        lock_stale_s=lock_stale_s,
        uv=env.get("RUNTIME_UV", "uv"),
    )


def _seconds(env: Mapping[str, str], name: str, default: str) -> float:
    try:
        value = float(env.get(name, default))
    except ValueError:
        value = -1.0
    if not value > 0:
        raise BootstrapError(f"{name} must be a number of seconds, more than 0")
    return value


def say(message: str) -> None:
    """Bootstrap output goes to stderr, line by line, so RunPod's log shows it at once."""
    print(f"[bootstrap] {message}", file=sys.stderr, flush=True)  # noqa: T201


def runtime_key(requirements: Path) -> str:
    """Names the runtime: lock file content, Python version and machine (16 hex digits)."""
    digest = hashlib.sha256(requirements.read_bytes())
    digest.update(f"|{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}".encode())
    digest.update(f"|{platform.machine()}".encode())
    return digest.hexdigest()[:16]


def verify(runtime: Path) -> list[str]:
    """Why `runtime` must not be used (no marker, or a tree that differs from its manifest);
    empty when it is exactly what was installed."""
    try:
        marker = json.loads((runtime / MARKER).read_bytes())
    except FileNotFoundError:
        return ["it has no completion marker"]
    except (OSError, ValueError) as error:
        return [f"its marker is unreadable ({error})"]
    files = marker.get("files") if isinstance(marker, dict) else None
    try:
        return runtime_manifest.problems(runtime, files, MARKER)
    except OSError as error:
        return [f"it could not be read ({error})"]


def usable(runtime: Path, *, report: bool = True) -> bool:
    """Verify a runtime that exists; one clear line when it is refused (if `report`)."""
    if not runtime.exists():
        return False
    started = time.monotonic()
    problems = verify(runtime)
    if not problems:
        say(f"verified {runtime} in {time.monotonic() - started:.2f} s")
        return True
    if not report:
        return False
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    say(f"NOT using the runtime {runtime}: {problems[0]}{more}; installing it again")
    return False


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
    if usable(runtime):
        say(f"reusing the runtime {runtime}")
        return runtime
    root.mkdir(parents=True, exist_ok=True)
    lock = VolumeLock(
        root / f"{key}.lock",
        stale_after_s=config.lock_stale_s,
        heartbeat_s=config.lock_stale_s / 12,
        wait_timeout_s=config.lock_wait_s,
        on_wait=say,
    )
    with lock:
        if usable(runtime, report=False):  # another worker installed it while this one waited
            say(f"reusing the runtime {runtime}, installed by another worker")
            return runtime
        stagings = [*root.glob(f".{key}.staging-*"), *root.glob(f".staging-{key}-*")]
        for leftover in [runtime, *stagings]:
            if leftover.exists():  # unfinished, refused, or left by a stalled installer
                say(f"removing {leftover}")
                remove_tree(leftover)
        staging = owner_sibling(runtime, "staging")
        try:
            install(config, staging)
            files = runtime_manifest.build(staging, MARKER)
            marker = {"key": key, "python": sys.version.split()[0], "installed_at": time.time()}
            if not lock.holds():  # stalled past the stale limit: another start owns it now
                raise BootstrapError(
                    f"another start took over the install lock {lock.path} while this one "
                    f"stalled for over {config.lock_stale_s:.0f} s; not publishing its runtime"
                )
            publish_directory(staging, runtime, MARKER, {**marker, "files": files})
        except ValueError as error:
            raise BootstrapError(f"the installed runtime cannot be trusted: {error}") from None
        finally:
            if staging.exists():
                remove_tree(staging)
    say(f"runtime ready at {runtime}")
    return runtime


def worker_env(env: Mapping[str, str], runtime: Path | None) -> dict[str, str]:
    out = dict(env)
    if runtime is not None:  # verified: the worker must not add bytecode to it
        out["PYTHONDONTWRITEBYTECODE"] = "1"
        out["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(runtime), env.get("PYTHONPATH", "")) if p
        )
    return out


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m higgs_runpod.container.bootstrap [-- COMMAND...]`: prepare, then exec."""
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
