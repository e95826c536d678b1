"""Remembered takes: a speech request's exact output, kept for a while so that its voice can
be kept later (a voice create with `take_id`) without generating it again.

Re-running a request with its seed repeats a take only where decoding is deterministic; on
a GPU (bf16, batch-dependent near-ties) it may not. So a request with `remember_take`
writes what it generated to the volume, where any worker that mounts it can find it:

    VOICES_PATH/.takes/ID/take.json   text (as spoken), description (a described voice's),
                                      tokenizer, created (epoch seconds)
    VOICES_PATH/.takes/ID/clip.wav    the decoded take, 24 kHz mono 16-bit
    VOICES_PATH/.takes/ID/codes.pt    the generated codes, as they are

ID is 32 random hex digits. A take is staged and renamed into place (never seen torn), and
claimed by a rename too, so of two keeps of one take exactly one gets it. Takes expire after
TAKE_TTL_S, and writing one sweeps the expired ones and the oldest beyond MAX_TAKES (each
take is at most MAX_REF_AUDIO_SECONDS long, so the count bounds the size).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from higgs_runpod.errors import RequestError, TakeNotFoundError

log = logging.getLogger(__name__)

TAKES_DIR = ".takes"
TAKE_ID = re.compile(r"^[0-9a-f]{32}$")
RECORD, CLIP, CODES = "take.json", "clip.wav", "codes.pt"
STALE_S = 3600.0  # a staging or claimed directory this old belongs to a writer that died


@dataclass(frozen=True)
class Take:
    """One remembered take, as written and as read back."""

    clip_wav: bytes
    codes: torch.Tensor  # (frames, codebooks), int64
    text: str
    description: str | None
    tokenizer_id: str


def new_take_id() -> str:
    return secrets.token_hex(16)


def check_take_id(take_id: Any, field: str = "take_id") -> str:
    """A take id as a speech response gave it, or RequestError (no path, no other name)."""
    if not isinstance(take_id, str) or not TAKE_ID.match(take_id):
        raise RequestError(field, "must be a take id as a speech response gave it (32 hex digits)")
    return take_id


class TakeStore:
    """Takes under VOICES_PATH/.takes: written, claimed (consumed), restored, swept."""

    def __init__(self, voices_path: Path, ttl_s: float, max_takes: int) -> None:
        self.root = voices_path / TAKES_DIR
        self.ttl_s = ttl_s
        self.max_takes = max_takes

    def write(self, take_id: str, take: Take) -> None:
        """Stage the take, rename it into place, then sweep the expired and the oldest."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".{check_take_id(take_id)}.{os.getpid()}.partial"
        try:
            staging.mkdir()
            (staging / CLIP).write_bytes(take.clip_wav)
            torch.save(take.codes.to(torch.int64).contiguous(), staging / CODES)
            record = {"text": take.text, "description": take.description,
                      "tokenizer": take.tokenizer_id, "created": time.time()}  # fmt: skip
            (staging / RECORD).write_text(json.dumps(record, ensure_ascii=False), "utf-8")
            os.rename(staging, self.root / take_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.sweep(keep=take_id)

    def claim(self, take_id: str) -> Path:
        """Take the take out of sight for this caller alone (a rename): TakeNotFoundError if
        it is unknown, expired, or claimed by another keep first."""
        check_take_id(take_id)
        claimed = self.root / f".{take_id}.{os.getpid()}.{secrets.token_hex(6)}.claimed"
        try:
            os.rename(self.root / take_id, claimed)
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(take_id) from None
        if self._age(claimed) > self.ttl_s:
            shutil.rmtree(claimed, ignore_errors=True)
            raise _not_found(take_id)
        return claimed

    def read(self, claimed: Path) -> Take:
        record = json.loads((claimed / RECORD).read_text("utf-8"))
        return Take(
            clip_wav=(claimed / CLIP).read_bytes(),
            codes=torch.load(claimed / CODES, map_location="cpu", weights_only=True),
            text=str(record["text"]),
            description=record.get("description"),
            tokenizer_id=str(record["tokenizer"]),
        )

    def restore(self, claimed: Path, take_id: str) -> None:
        """Give a claimed take back (the voice could not be made from it)."""
        try:
            os.rename(claimed, self.root / take_id)
        except OSError:
            shutil.rmtree(claimed, ignore_errors=True)

    def sweep(self, keep: str | None = None) -> None:
        """Delete expired takes, stale staging, and the oldest takes beyond MAX_TAKES."""
        live: list[tuple[float, Path]] = []
        for path in self.root.iterdir():
            age = self._age(path)
            if path.name.startswith("."):
                if age > STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            elif age > self.ttl_s and path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
            else:
                live.append((age, path))
        live.sort(key=lambda item: item[0])  # youngest first
        for _, path in live[self.max_takes :]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)

    def _age(self, path: Path) -> float:
        """Seconds since the take was written: its record's time, else the entry's mtime
        (staging, or a record that cannot be read)."""
        try:
            created = json.loads((path / RECORD).read_text("utf-8"))["created"]
            return time.time() - float(created)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        try:
            return time.time() - path.stat().st_mtime
        except OSError:
            return 0.0


def _not_found(take_id: str) -> TakeNotFoundError:
    return TakeNotFoundError(
        "take_id",
        f"no take {take_id!r}: unknown, expired (TAKE_TTL_S), already kept, or its request "
        "is still generating",
    )
