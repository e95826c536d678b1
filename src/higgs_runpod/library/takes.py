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
take is at most MAX_REF_AUDIO_SECONDS long, so the count bounds the size). The volume is
not trusted: a take is read only within the sizes such a take can have, and one that is
too big or malformed is deleted and answered as not found.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from higgs_runpod.errors import RequestError, TakeNotFoundError
from higgs_runpod.request.voices import SAMPLE_RATE
from higgs_runpod.synthesis.voice_cache import check_codes

log = logging.getLogger(__name__)

TAKES_DIR = ".takes"
TAKE_ID = re.compile(r"^[0-9a-f]{32}$")
RECORD, CLIP, CODES = "take.json", "clip.wav", "codes.pt"
STALE_S = 3600.0  # a staging or claimed directory this old belongs to a writer that died
MAX_RECORD_BYTES = 64 * 1024  # text, description and tokenizer id, as written
MAX_CODEBOOKS = 64  # bounds the codes file with the frame count; the model has 8
FRAME_RATE = 25  # the audio tokenizer's frames per second


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

    def __init__(self, voices_path: Path, ttl_s: float, max_takes: int, max_seconds: float) -> None:
        self.root = voices_path / TAKES_DIR
        self.ttl_s = ttl_s
        self.max_takes = max_takes
        frames = int(max_seconds * FRAME_RATE) + 1
        self._max_clip_bytes = int(max_seconds * SAMPLE_RATE) * 2 + 4096  # 16-bit + header
        self._max_codes_bytes = frames * MAX_CODEBOOKS * 8 + 64 * 1024  # int64 + torch.save's

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

    def read(self, claimed: Path, take_id: str) -> Take:
        """The claimed take, read within the sizes a take can have; a take too big or
        malformed (the volume is not trusted) is deleted and TakeNotFoundError raised."""
        try:
            record = json.loads(_bounded(claimed / RECORD, MAX_RECORD_BYTES))
            codes = torch.load(io.BytesIO(_bounded(claimed / CODES, self._max_codes_bytes)),
                               map_location="cpu", weights_only=True)  # fmt: skip
            description = record.get("description")
            problem = check_codes(codes, None)
            if problem is not None or not isinstance(description, str | None):
                raise ValueError(problem or "its description is not a string")
            return Take(
                clip_wav=_bounded(claimed / CLIP, self._max_clip_bytes),
                codes=codes,
                text=str(record["text"]),
                description=description,
                tokenizer_id=str(record["tokenizer"]),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
                pickle.UnpicklingError) as error:  # fmt: skip
            log.warning("take %s is unreadable (%s): deleted", take_id, type(error).__name__)
            shutil.rmtree(claimed, ignore_errors=True)
            raise _not_found(take_id) from None

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


def _bounded(path: Path, limit: int) -> bytes:
    """A file's bytes, refused (ValueError) past `limit` without reading more than that."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path.name} is over {limit} bytes")
    return data


def _not_found(take_id: str) -> TakeNotFoundError:
    return TakeNotFoundError(
        "take_id",
        f"no take {take_id!r}: unknown, expired (TAKE_TTL_S), already kept, unreadable, or "
        "its request is still generating",
    )
