"""The voice library on the volume: voices people add, list, fetch and delete by name.

Every worker that mounts VOICES_PATH reads it at each request, so a change made by one
worker is seen by all of them without a restart. One voice is one directory:

    VOICES_PATH/NAME/voice.json   name, transcript, description, consent, created_at,
                                  source (upload | take), duration_s
    VOICES_PATH/NAME/clip.wav     the clip, 24 kHz mono 16-bit
    VOICES_PATH/NAME/codes.pt     its audio codes and the tokenizer they belong to, so that
                                  no worker encodes the clip again (a take's are the
                                  generated codes themselves)

A voice is written into a hidden staging directory and then renamed into place: rename
either wins the name or fails because the name is taken, so of two workers creating one
name exactly one succeeds, and a torn write is never visible. Voices copied by hand as
`NAME.wav|flac|mp3|ogg|m4a` beside `NAME.txt` still work (source `file`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import av
import torch

from higgs_runpod.errors import (
    RequestError,
    VoiceExistsError,
    VoiceLimitError,
    VoiceNotFoundError,
)

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
METADATA, CLIP, CODES = "voice.json", "clip.wav", "codes.pt"
STALE_STAGING_S = 3600.0  # a staging directory this old belongs to a writer that died

Source = Literal["upload", "take", "file"]


@dataclass(frozen=True)
class LibraryVoice:
    """One voice of the library as stored; `directory` is None for a hand-copied voice."""

    name: str
    audio_path: Path
    transcript: str
    description: str | None
    consent: str | None
    created_at: str
    source: Source
    duration_s: float | None
    directory: Path | None

    def public(self) -> dict[str, Any]:
        """The voice object every API returns."""
        return {
            "name": self.name,
            "transcript": self.transcript,
            "description": self.description,
            "consent": self.consent,
            "created_at": self.created_at,
            "source": self.source,
            "duration_s": self.duration_s,
        }

    @property
    def codes_path(self) -> Path | None:
        return self.directory / CODES if self.directory else None


def list_library(voices_path: Path) -> list[LibraryVoice]:
    """Every voice of the library, sorted by name; unreadable entries are logged and skipped."""
    if not voices_path.is_dir():
        return []
    found: dict[str, LibraryVoice] = {}
    for path in sorted(voices_path.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if not (path / METADATA).is_file():
                continue
            voice = _read_directory(path)
        elif path.suffix.lower() in AUDIO_SUFFIXES and path.with_suffix(".txt").is_file():
            voice = _read_file_voice(path)
        else:
            continue
        if voice is not None:
            found.setdefault(voice.name, voice)
    return sorted(found.values(), key=lambda voice: voice.name)


def find_voice(voices_path: Path, name: str) -> LibraryVoice | None:
    """The voice called `name`, read from the volume now (another worker may have changed it)."""
    directory = voices_path / name
    if NAME_PATTERN.match(name) and (directory / METADATA).is_file():
        return _read_directory(directory)
    for suffix in AUDIO_SUFFIXES:
        path = voices_path / f"{name}{suffix}"
        if not name.startswith(".") and path.is_file() and path.with_suffix(".txt").is_file():
            return _read_file_voice(path)
    return None


def _read_directory(directory: Path) -> LibraryVoice | None:
    try:
        meta = json.loads((directory / METADATA).read_text(encoding="utf-8"))
        return LibraryVoice(
            name=directory.name,
            audio_path=directory / CLIP,
            transcript=str(meta["transcript"]),
            description=meta.get("description"),
            consent=meta.get("consent"),
            created_at=str(meta["created_at"]),
            source=meta["source"],
            duration_s=meta.get("duration_s"),
            directory=directory,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("library voice %s unreadable: %s", directory.name, error)
        return None


def _read_file_voice(path: Path) -> LibraryVoice | None:
    try:
        transcript = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        created = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    except (OSError, UnicodeDecodeError) as error:
        log.warning("library voice %s unreadable: %s", path.stem, error)
        return None
    return LibraryVoice(
        name=path.stem,
        audio_path=path,
        transcript=transcript,
        description=None,
        consent=None,
        created_at=_iso(created),
        source="file",
        duration_s=_probe_duration(path),
        directory=None,
    )


def _probe_duration(path: Path) -> float | None:
    """A hand-copied clip's length from its container, without decoding it."""
    try:
        with av.open(str(path)) as container:
            if container.duration is None:
                return None
            return round(container.duration / av.time_base, 3)
    except (av.FFmpegError, OSError):
        return None


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class NewVoice:
    """What a create writes: the clip as WAV bytes and what the caller said about it."""

    name: str
    clip_wav: bytes
    duration_s: float
    transcript: str
    description: str | None = None
    consent: str | None = None
    source: Source = "upload"
    codes: torch.Tensor | None = None  # (frames, codebooks)
    tokenizer_id: str | None = None


def check_name(name: Any, field: str, reserved: frozenset[str]) -> str:
    """A library voice name, or RequestError: the pattern, then the reserved names."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RequestError(field, f"must match {NAME_PATTERN.pattern} (letters, digits, '_', '-')")
    if name.lower() in reserved:
        raise RequestError(
            field,
            f"{name!r} is an OpenAI voice name, reserved for the voice map "
            "(VOICE_ALLOW_OPENAI_NAMES=true lets the library take it)",
        )
    return name


def codes_digest(clip_wav: bytes) -> str:
    """What a codes file records of its clip, so codes never outlive the clip they encode."""
    return hashlib.sha256(clip_wav).hexdigest()


class VoiceStore:
    """Writes and deletes library voices under `root`, atomically (see the module doc)."""

    def __init__(self, root: Path, max_voices: int) -> None:
        self.root = root
        self.max_voices = max_voices

    def create(self, voice: NewVoice, *, overwrite: bool = False) -> LibraryVoice:
        """Stage the voice, then rename it into place; VoiceExistsError if the name is
        taken (and `overwrite` is false), VoiceLimitError at MAX_VOICES."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep_stale()
        existing = find_voice(self.root, voice.name)
        if existing is not None and not overwrite:
            raise exists_error(voice.name)
        if existing is None and len(list_library(self.root)) >= self.max_voices:
            raise limit_error(self.max_voices)
        staging = self._hidden(voice.name, "partial")
        replaced: Path | None = None
        try:
            self._write(staging, voice)
            if existing is not None:  # out of sight and the new one in: two renames apart
                replaced = self._hide(existing)
            try:
                os.rename(staging, self.root / voice.name)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise exists_error(voice.name) from None  # another writer won the name
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
        found = find_voice(self.root, voice.name)
        assert found is not None
        if existing is None and len(list_library(self.root)) > self.max_voices:
            # Another worker added a voice between our count and our rename: the library
            # must not end up over the limit, so this one leaves again.
            self._retire(found)
            raise limit_error(self.max_voices)
        return found

    def delete(self, name: str) -> LibraryVoice:
        """Remove the voice and its codes; VoiceNotFoundError if there is none."""
        voice = find_voice(self.root, name)
        if voice is None:
            raise VoiceNotFoundError("name", f"no library voice is called {name!r}")
        self._retire(voice)
        return voice

    def save_codes(self, voice: LibraryVoice, codes: torch.Tensor, tokenizer_id: str) -> None:
        """Add the codes of a voice that had none (a hand-copied or CLI-added one)."""
        if voice.directory is None:
            return
        try:
            clip = voice.audio_path.read_bytes()
            partial = voice.directory / f".{CODES}.{uuid.uuid4().hex}.partial"
            torch.save(_codes_record(codes, tokenizer_id, clip), partial)
            os.replace(partial, voice.directory / CODES)
        except OSError as error:  # the voice still works; the next worker encodes it again
            log.warning("codes of voice %s not written: %s", voice.name, error)

    def _write(self, staging: Path, voice: NewVoice) -> None:
        staging.mkdir()
        (staging / CLIP).write_bytes(voice.clip_wav)
        if voice.codes is not None and voice.tokenizer_id is not None:
            record = _codes_record(voice.codes, voice.tokenizer_id, voice.clip_wav)
            torch.save(record, staging / CODES)
        meta = {
            "transcript": voice.transcript,
            "description": voice.description,
            "consent": voice.consent,
            "created_at": _iso(datetime.now(UTC)),
            "source": voice.source,
            "duration_s": round(voice.duration_s, 3),
        }
        (staging / METADATA).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")

    def _retire(self, voice: LibraryVoice) -> None:
        """Take a voice out of sight at once, then delete its files."""
        hidden = self._hide(voice)
        if hidden is not None:
            shutil.rmtree(hidden, ignore_errors=True)

    def _hide(self, voice: LibraryVoice) -> Path | None:
        """Take a voice out of sight at once (a rename); returns the directory to delete,
        None when nothing is left to (a hand-copied voice's files are unlinked here, and a
        voice another worker deleted first is gone already)."""
        if voice.directory is None:
            voice.audio_path.unlink(missing_ok=True)
            voice.audio_path.with_suffix(".txt").unlink(missing_ok=True)
            return None
        hidden = self._hidden(voice.name, "deleted")
        try:
            os.rename(voice.directory, hidden)
        except FileNotFoundError:
            return None
        return hidden

    def _hidden(self, name: str, kind: str) -> Path:
        return self.root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{kind}"

    def _sweep_stale(self) -> None:
        """Staging left by a writer that died mid-write (it is never read, only in the way)."""
        cutoff = time.time() - STALE_STAGING_S
        for path in self.root.glob(".*.partial"):
            try:
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue


def _codes_record(codes: torch.Tensor, tokenizer_id: str, clip: bytes) -> dict[str, Any]:
    return {
        "codes": codes.to(torch.int64).contiguous(),
        "tokenizer": tokenizer_id,
        "clip": codes_digest(clip),
    }


def exists_error(name: str, field: str = "name") -> VoiceExistsError:
    return VoiceExistsError(
        field, f"a library voice is already called {name!r} (set overwrite to replace it)"
    )


def limit_error(max_voices: int, field: str = "name") -> VoiceLimitError:
    return VoiceLimitError(
        field, f"the library holds {max_voices} voices (MAX_VOICES); delete one first"
    )
