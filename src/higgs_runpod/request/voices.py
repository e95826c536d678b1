"""Reference voices: the preset library on disk and clips sent with a request.

Every voice a request can name ends up as one of two things the prompt builder uses:
a `ReferenceClip` (24 kHz mono samples plus their transcript, for cloning) or a
`VoiceDescription` (words describing the voice). Clip bytes come from the library
(library.py, on VOICES_PATH), from base64 in the request, or from an https URL fetched by
outbound.py (size cap, deadline, minimum rate, no private addresses). A library clip keeps
a note of its voice, whose stored codes the worker uses instead of encoding the clip.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass

import numpy as np
import torch

from higgs_runpod import outbound
from higgs_runpod.errors import RequestError
from higgs_runpod.library.store import LibraryVoice, codes_digest, find_voice, list_library
from higgs_runpod.request.schema import CloneFromBase64, CloneFromUrl, DescribedVoice, Voice
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio

SAMPLE_RATE = 24_000
MIN_CLIP_SECONDS = 0.5
LISTED_VOICES = 20  # names an unknown-voice error lists


@dataclass(frozen=True)
class ReferenceClip:
    samples: np.ndarray  # float32 mono at SAMPLE_RATE
    transcript: str
    codes: torch.Tensor | None = None  # (frames, codebooks), once known: no encode
    library: LibraryVoice | None = None  # the library voice it came from
    clip_digest: str | None = None  # of the library clip's bytes (see library.codes_digest)


@dataclass(frozen=True)
class VoiceDescription:
    text: str


ResolvedVoice = ReferenceClip | VoiceDescription


class VoiceResolver:
    """Turns request voices into clips and descriptions, enforcing the settings' limits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def resolve_async(self, voice: Voice, field: str) -> ResolvedVoice:
        """Any voice; a URL clip downloads on the event loop (see outbound.py: a cancelled
        job closes the connection at once) and decodes in a thread, like the others."""
        if isinstance(voice, CloneFromUrl):
            field = f"{field}.audio_url"
            data = await outbound.download(voice.audio_url, field, self.settings)
            return await asyncio.to_thread(self._clip, data, voice.transcript, field)
        return await asyncio.to_thread(self.resolve, voice, field)

    def resolve(self, voice: Voice, field: str) -> ResolvedVoice:
        """A voice that needs no download (URL clips go through `resolve_async`)."""
        if isinstance(voice, str):
            return self._preset(voice, field)
        if isinstance(voice, DescribedVoice):
            return VoiceDescription(voice.description)
        if isinstance(voice, CloneFromBase64):
            data = self._base64(voice.audio_base64, f"{field}.audio_base64")
            return self._clip(data, voice.transcript, f"{field}.audio_base64")
        raise TypeError(f"unknown voice type {type(voice).__name__}")

    def _preset(self, name: str, field: str) -> ReferenceClip:
        entry = find_voice(self.settings.voices_path, name)
        if entry is not None:
            return self.library_clip(entry, field)
        names = [v.name for v in list_library(self.settings.voices_path)]
        known = ", ".join(names[:LISTED_VOICES]) or "none"
        if len(names) > LISTED_VOICES:  # a big library would make every typo a long read
            known += f" and {len(names) - LISTED_VOICES} more"
        raise RequestError(field, f"unknown voice {name!r} (library voices: {known})")

    def library_clip(self, entry: LibraryVoice, field: str) -> ReferenceClip:
        """A library voice's clip, decoded (and limited) like any other."""
        try:
            data = entry.audio_path.read_bytes()
        except OSError:  # deleted by another worker since it was listed
            raise RequestError(field, f"unknown voice {entry.name!r}") from None
        clip = self.clip(data, entry.transcript, field)
        return ReferenceClip(
            clip.samples, clip.transcript, library=entry, clip_digest=codes_digest(data)
        )

    def clip(self, data: bytes, transcript: str, field: str) -> ReferenceClip:
        """Clip bytes in any format (the caller's or the library's), with the clip limits."""
        return self._clip(data, transcript, field)

    def decode_base64(self, text: str, field: str) -> bytes:
        """A clip's bytes from base64, with the same size limit as a voice's audio_base64."""
        return self._base64(text, field)

    def _base64(self, text: str, field: str) -> bytes:
        limit = self.settings.max_ref_audio_bytes
        if len(text) > (limit * 4) // 3 + 4:
            raise RequestError(field, f"is larger than {limit} bytes")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(field, "is not valid base64") from None

    def _clip(self, data: bytes, transcript: str, field: str) -> ReferenceClip:
        limit = self.settings.max_ref_audio_bytes
        if len(data) > limit:
            raise RequestError(field, f"is larger than {limit} bytes")
        max_seconds = self.settings.max_ref_audio_seconds
        try:
            decoded = audio.decode(data, SAMPLE_RATE, max_seconds=max_seconds)
        except audio.AudioDecodeError as error:
            raise RequestError(field, f"audio {error}") from None
        if decoded.duration_s < MIN_CLIP_SECONDS:
            raise RequestError(field, f"audio is shorter than {MIN_CLIP_SECONDS} seconds")
        return ReferenceClip(decoded.samples, transcript)
