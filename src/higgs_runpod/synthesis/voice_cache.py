"""Reference clips encoded to audio codes once, then reused.

Encoding a clip runs the audio tokenizer's encoder, which costs far more than everything
else in preparing a prompt. A clip's codes depend only on its samples and on the tokenizer,
so the key is a hash of both: the same clip sent again (or a library voice used by every
request) is encoded once per tokenizer. Codes live in a bounded in-memory LRU and, when a
directory is set (on the volume), in one small file per clip that survives restarts and is
shared by every worker mounting the volume.

Files on the volume are not trusted: a file is used only if it holds an int64 tensor of
frames x the model's codebooks with every code inside the codebook, and the directory is
kept under VOICE_CACHE_MAX_MB by deleting the files used longest ago (a disk hit touches
its file). Temporary files left by a worker that died mid-write are swept with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

log = logging.getLogger(__name__)

STALE_PARTIAL_S = 600.0  # a temporary file this old belongs to a writer that died
CodesSource = Literal["memory", "disk", "encoded"]


@dataclass(frozen=True)
class CodesShape:
    """What the loaded model accepts: codes per frame, and codes per codebook."""

    codebooks: int
    codebook_size: int

    def problem(self, codes: object) -> str | None:
        """Why `codes` cannot be this model's reference codes, or None when they can."""
        if not isinstance(codes, torch.Tensor):
            return f"holds {type(codes).__name__}, not a tensor"
        if codes.dtype != torch.int64:
            return f"holds {codes.dtype}, not int64 codes"
        if codes.ndim != 2 or codes.shape[1] != self.codebooks or codes.shape[0] == 0:
            return f"has shape {tuple(codes.shape)}, not (frames, {self.codebooks})"
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.codebook_size:
            return f"has codes {low}..{high}, outside 0..{self.codebook_size - 1}"
        return None


def tokenizer_identity(path: Path, commit: str | None) -> str:
    """The tokenizer's commit when one was recorded, else its files' names, sizes and times."""
    if commit:
        return f"commit:{commit}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"files:{digest.hexdigest()}"


class VoiceCache:
    """Codes (frames x codebooks, on the CPU) by clip content and tokenizer identity."""

    def __init__(self, tokenizer_id: str, max_items: int, directory: Path | None) -> None:
        self.tokenizer_id = tokenizer_id
        self.max_items = max_items
        self.directory = (
            directory / hashlib.sha256(tokenizer_id.encode()).hexdigest()[:16]
            if directory
            else None
        )
        self.shape: CodesShape | None = None  # set by `bind` once the model is loaded
        self.max_bytes: int | None = None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def bind(self, shape: CodesShape, max_bytes: int | None) -> None:
        """The loaded model's codes shape (files are checked against it) and the disk quota."""
        self.shape, self.max_bytes = shape, max_bytes

    def key(self, samples: np.ndarray) -> str:
        digest = hashlib.sha256(self.tokenizer_id.encode() + b"\0")
        digest.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def codes(
        self, samples: np.ndarray, encode: Callable[[np.ndarray], torch.Tensor]
    ) -> torch.Tensor:
        """The clip's codes: from memory, else from disk, else `encode(samples)` (then stored)."""
        return self.lookup(samples, encode)[0]

    def lookup(
        self, samples: np.ndarray, encode: Callable[[np.ndarray], torch.Tensor]
    ) -> tuple[torch.Tensor, CodesSource]:
        """Like `codes`, and where they came from (a request reports it in its timings)."""
        key = self.key(samples)
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return found, "memory"
        found = self._load(key)
        source: CodesSource = "disk"
        if found is not None:
            self.disk_hits += 1
        else:
            self.misses += 1
            source = "encoded"
            found = encode(samples).cpu()
            self._save(key, found)
        self._remember(key, found)
        return found, source

    def forget(self, samples: np.ndarray) -> None:
        """Drop a clip's codes from memory and disk (its library voice was deleted)."""
        key = self.key(samples)
        with self._lock:
            self._memory.pop(key, None)
        file = self._file(key)
        if file is not None:
            file.unlink(missing_ok=True)

    def _remember(self, key: str, codes: torch.Tensor) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._memory[key] = codes
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)

    def _file(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory else None

    def _load(self, key: str) -> torch.Tensor | None:
        file = self._file(key)
        if file is None or not file.is_file():
            return None
        try:
            codes = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # a torn or foreign file: encode again and overwrite it
            log.warning("voice cache file %s unreadable (%s); encoding again", file.name, error)
            return None
        problem = check_codes(codes, self.shape)
        if problem is not None:
            log.warning("voice cache file %s %s; encoding again", file.name, problem)
            return None
        with contextlib.suppress(OSError):
            os.utime(file)  # last use, for the quota's eviction
        return codes

    def _save(self, key: str, codes: torch.Tensor) -> None:
        file = self._file(key)
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}.partial")
            torch.save(codes.contiguous(), partial)
            os.replace(partial, file)  # readers see the whole file or none
        except OSError as error:  # a full or read-only volume costs speed, not the request
            log.warning("voice cache not written to %s: %s", file.parent, error)
            return
        self._enforce_quota(keep=file)

    def _enforce_quota(self, keep: Path) -> None:
        """Delete stale temporary files, then the files used longest ago while the
        directory is over `max_bytes` (never `keep`, the file just written)."""
        if self.directory is None or self.max_bytes is None:
            return
        now = time.time()
        files: list[tuple[float, int, Path]] = []
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
            except OSError:  # another worker removed it meanwhile
                continue
            if path.name.endswith(".partial"):
                if now - stat.st_mtime > STALE_PARTIAL_S:
                    path.unlink(missing_ok=True)
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def check_codes(codes: object, shape: CodesShape | None) -> str | None:
    """Why loaded `codes` are unusable, or None; without a model shape known, only the
    dtype and layout (int64 frames x codebooks, no negative code) are checked."""
    if shape is not None:
        return shape.problem(codes)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or codes.ndim != 2:
        return "is not an int64 (frames, codebooks) tensor"
    if codes.numel() == 0 or int(codes.min()) < 0:
        return "holds no codes or negative ones"
    return None
