"""What the runtime on the volume must hold, file by file (standard library only).

The runtime directory goes first on the worker's `PYTHONPATH`, so anything in it runs
with the worker's rights: a `sitecustomize.py` dropped there would run before the worker
itself. Its completion marker therefore carries a manifest written at install time (every
file's size and SHA-256), and the bootstrap checks the tree against it before each use:

- every listed file is there, as a regular file, with its size and hash;
- nothing unlisted could run: no unlisted `.py`, `.pyc`, `.pth`, `.so` (or `.so.N`) file
  and no `sitecustomize` / `usercustomize` anywhere, and no symbolic link at all (the
  installer never makes one, and one could lead the check somewhere else);
- other unlisted files (notes, caches of data) are ignored: nothing imports them.

Hashing is spread over threads (hashlib releases the GIL), because a reuse start on a
network volume is bound by reading the files; see `bench/bootstrap_reuse.py`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pth", ".so", ".pyd")
STARTUP_HOOKS = ("sitecustomize", "usercustomize")
HASH_THREADS = min(32, 4 * (os.cpu_count() or 1))
READ_CHUNK = 4 * 1024 * 1024
MAX_PROBLEMS = 5  # a tampered tree can have thousands; the first few say enough

Manifest = dict[str, list]  # relative path -> [size, sha256 hex]


def could_run(name: str) -> bool:
    """Whether Python (or a loader) might execute a file of this name found on the path."""
    return name.endswith(CODE_SUFFIXES) or ".so." in name or name.startswith(STARTUP_HOOKS)


def _walk(root: Path, skip: str) -> Iterator[tuple[str, os.stat_result | None]]:
    """(relative path, lstat) of every entry below `root`; stat None for a symbolic link."""
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                relative = Path(entry.path).relative_to(root).as_posix()
                if relative == skip:
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(info.st_mode):
                    yield relative, None
                elif stat.S_ISDIR(info.st_mode):
                    pending.append(Path(entry.path))
                else:
                    yield relative, info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build(root: Path, skip: str) -> Manifest:
    """The manifest of a freshly installed tree (`skip`: the marker's own name)."""
    entries = sorted(_walk(root, skip))
    links = [relative for relative, info in entries if info is None]
    if links:
        raise ValueError(f"the install made symbolic links, which are never trusted: {links[:3]}")
    sizes = [(relative, info.st_size) for relative, info in entries if info is not None]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        hashes = pool.map(lambda item: _sha256(root / item[0]), sizes)
        return {rel: [size, digest] for (rel, size), digest in zip(sizes, hashes, strict=True)}


def problems(root: Path, manifest: object, skip: str) -> list[str]:
    """What makes `root` differ from `manifest` (at most MAX_PROBLEMS); empty: trusted."""
    if not isinstance(manifest, dict) or not manifest:
        return ["its marker holds no file manifest (installed by an older version)"]
    found: list[str] = []
    sizes_ok: list[tuple[str, str]] = []
    seen = set()
    for relative, info in _walk(root, skip):
        seen.add(relative)
        listed = manifest.get(relative)
        if info is None:
            found.append(f"{relative} is a symbolic link")
        elif listed is None:
            if could_run(relative.rsplit("/", 1)[-1]):
                found.append(f"{relative} is not in the manifest")
        elif not stat.S_ISREG(info.st_mode) or info.st_size != listed[0]:
            found.append(f"{relative} has {info.st_size} bytes, expected {listed[0]}")
        else:
            sizes_ok.append((relative, listed[1]))
        if len(found) >= MAX_PROBLEMS:
            return found
    found += [f"{relative} is missing" for relative in manifest if relative not in seen]
    if found:
        return found[:MAX_PROBLEMS]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        results = pool.map(lambda item: (item[0], _sha256(root / item[0]) == item[1]), sizes_ok)
        for relative, same in results:
            if not same:
                pool.shutdown(wait=False, cancel_futures=True)
                return [f"{relative} has the wrong sha256"]
    return []
