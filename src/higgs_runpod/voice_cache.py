"""Reference clips encoded to audio codes once, then reused.

Encoding a clip runs the audio tokenizer's encoder, which costs far more than everything
else in preparing a prompt. A clip's codes depend only on its samples and on the tokenizer,
so the key is a hash of both: the same clip sent again (or a library voice used by every
request) is encoded once per tokenizer. Codes live in a bounded in-memory LRU and, when a
directory is set (on the volume), in one small file per clip that survives restarts and is
shared by every worker mounting the volume.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


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
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def key(self, samples: np.ndarray) -> str:
        digest = hashlib.sha256(self.tokenizer_id.encode() + b"\0")
        digest.update(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def codes(
        self, samples: np.ndarray, encode: Callable[[np.ndarray], torch.Tensor]
    ) -> torch.Tensor:
        """The clip's codes: from memory, else from disk, else `encode(samples)` (then stored)."""
        key = self.key(samples)
        with self._lock:
            found = self._memory.get(key)
            if found is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return found
        found = self._load(key)
        if found is not None:
            self.disk_hits += 1
        else:
            self.misses += 1
            found = encode(samples).cpu()
            self._save(key, found)
        self._remember(key, found)
        return found

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
        return codes if isinstance(codes, torch.Tensor) and codes.ndim == 2 else None

    def _save(self, key: str, codes: torch.Tensor) -> None:
        file = self._file(key)
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            partial = file.with_name(f".{file.name}.{os.getpid()}.{threading.get_ident()}")
            torch.save(codes.contiguous(), partial)
            os.replace(partial, file)  # readers see the whole file or none
        except OSError as error:  # a full or read-only volume costs speed, not the request
            log.warning("voice cache not written to %s: %s", file.parent, error)
