"""Managing the voice library: what the HTTP routes, the queue actions and the CLI share.

    fields + clip bytes --schema--> checked fields --voices (the request clip path: size,
        decoder, duration)--> 24 kHz samples --WAV--> clip --encoder (when a model is
        loaded)--> codes --library.VoiceStore (stage, rename)--> voice object
    fields + take_id --takes.TakeStore.claim--> the take's clip and generated codes, as they
        are (no decode, no encode) --VoiceStore--> voice object (source take)

The clip stored is the 16-bit WAV a worker will read back, and its codes are encoded from
that WAV as read back, so a request naming the voice gets the very codes stored.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from higgs_runpod import outbound
from higgs_runpod.errors import RequestError, VoiceNotFoundError
from higgs_runpod.library.store import (
    LibraryVoice,
    NewVoice,
    Source,
    VoiceStore,
    check_name,
    exists_error,
    find_voice,
    limit_error,
    list_library,
)
from higgs_runpod.library.takes import Take, TakeStore, check_take_id
from higgs_runpod.request.openai_schema import OPENAI_VOICES
from higgs_runpod.request.schema import VoiceFields, parse_voice_fields
from higgs_runpod.request.voices import SAMPLE_RATE, ReferenceClip, VoiceResolver
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio
from higgs_runpod.synthesis.voice_cache import CodesShape, check_codes

log = logging.getLogger(__name__)

ACTIONS = ("voice.create", "voice.list", "voice.get", "voice.delete")


@dataclass(frozen=True)
class Encoder:
    """The loaded model's audio encoder and what identifies its codes."""

    encode: Callable[[np.ndarray], torch.Tensor]
    tokenizer_id: str
    shape: CodesShape | None


class VoiceService:
    """Create, list, fetch and delete library voices under the settings' limits."""

    def __init__(
        self,
        settings: Settings,
        resolver: VoiceResolver,
        encoder: Callable[[], Encoder] | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.encoder = encoder  # None: no model here (the CLI filling a volume)
        self.store = VoiceStore(settings.voices_path, settings.max_voices)
        self.takes = TakeStore(
            settings.voices_path,
            settings.take_ttl_s,
            settings.max_takes,
            settings.max_ref_audio_seconds,
        )

    @property
    def reserved(self) -> frozenset[str]:
        return frozenset() if self.settings.voice_allow_openai_names else frozenset(OPENAI_VOICES)

    def list(self) -> dict[str, Any]:
        return {"voices": [voice.public() for voice in list_library(self.settings.voices_path)]}

    def get(self, name: str) -> LibraryVoice:
        voice = find_voice(self.settings.voices_path, name)
        if voice is None:
            raise VoiceNotFoundError("name", f"no library voice is called {name!r}")
        return voice

    def delete(self, name: str, forget: Callable[[np.ndarray], None] | None = None) -> None:
        """Delete a voice; `forget` drops a hand-copied voice's codes from the voice cache
        (a library directory takes its own codes with it)."""
        voice = self.get(name)
        samples = None
        if voice.directory is None and forget is not None:
            try:
                samples = self.resolver.library_clip(voice, "name").samples
            except RequestError:
                samples = None  # an unreadable clip has no cached codes to drop
        self.store.delete(name)
        if samples is not None and forget is not None:
            forget(samples)

    async def create(self, raw: dict[str, Any], clip: bytes | None = None) -> LibraryVoice:
        """A voice from its fields and clip: `clip` (a form's file), else audio_base64 or
        audio_url in `raw` (downloaded on the event loop, like a request's audio_url), or
        a remembered take's `take_id` (its own clip and codes)."""
        fields = parse_voice_fields(raw)
        if fields.take_id is not None:
            check_take_id(fields.take_id)
        elif fields.transcript is None:
            raise RequestError("transcript", "is required")
        await asyncio.to_thread(
            self.check_new, fields.name, fields.consent, fields.overwrite, "name"
        )
        data = await self._clip_bytes(fields, clip)
        if fields.take_id is not None:
            return await asyncio.to_thread(self._create_from_take, fields, fields.take_id)
        assert data is not None
        return await asyncio.to_thread(self._create, fields, data)

    def _create(self, fields: VoiceFields, data: bytes) -> LibraryVoice:
        assert fields.transcript is not None
        samples = self.resolver.clip(data, fields.transcript, "audio").samples
        return self.add(fields.name, samples, fields, source="upload", field="audio")

    def _create_from_take(self, fields: VoiceFields, take_id: str) -> LibraryVoice:
        """The remembered take as a voice, its clip and codes exactly as generated; the take
        is consumed, or given back when the voice cannot be made (a name taken meanwhile)."""
        claimed = self.takes.claim(take_id)
        try:
            take = self.takes.read(claimed, take_id)
            transcript = fields.transcript or take.text
            stored = self.resolver.clip(take.clip_wav, transcript, "take_id")  # the limits
            voice = NewVoice(
                name=fields.name,
                clip_wav=take.clip_wav,
                duration_s=len(stored.samples) / SAMPLE_RATE,
                transcript=transcript,
                description=fields.description or take.description,
                consent=fields.consent,
                source="take",
                codes=take.codes,
                tokenizer_id=take.tokenizer_id,
            )
            made = self.store.create(voice, overwrite=fields.overwrite)
        except BaseException:
            self.takes.restore(claimed, take_id)
            raise
        shutil.rmtree(claimed, ignore_errors=True)
        return made

    def remember(
        self, take_id: str, samples: np.ndarray, text: str, description: str | None,
        codes: torch.Tensor,
    ) -> None:  # fmt: skip
        """Write a take for a later keep: its clip as a WAV (as save_voice stores it), its
        codes as generated. The clip limits are checked by the keep, so that a take too
        short to keep fails only there, not the request that made it."""
        assert self.encoder is not None  # a speech request: the model is loaded
        clip_wav = audio.encode(samples, SAMPLE_RATE, "wav")
        self.takes.write(take_id, Take(clip_wav, codes, text, description,
                                       self.encoder().tokenizer_id))  # fmt: skip

    def check_new(self, name: str, consent: str | None, overwrite: bool, field: str) -> None:
        """Every refusal that needs no clip: the name, its owner, MAX_VOICES, consent."""
        check_name(name, field, self.reserved)
        if self.settings.voice_require_consent and consent is None:
            raise RequestError(
                field.replace("name", "consent"),
                "is required: this worker keeps voices only with a record of consent "
                "(VOICE_REQUIRE_CONSENT)",
            )
        existing = find_voice(self.settings.voices_path, name)
        if existing is not None and not overwrite:
            raise exists_error(name, field)
        if existing is None and len(list_library(self.settings.voices_path)) >= (
            self.settings.max_voices
        ):
            raise limit_error(self.settings.max_voices, field)

    def add(
        self,
        name: str,
        samples: np.ndarray,
        fields: VoiceFields,
        *,
        source: Source,
        field: str,
        codes: torch.Tensor | None = None,
    ) -> LibraryVoice:
        """Store 24 kHz samples as a voice; `codes` (a take's) are stored as they are, else
        the clip is encoded here when a model is loaded. `field` names the clip in errors."""
        assert fields.transcript is not None
        clip_wav = audio.encode(samples, SAMPLE_RATE, "wav")
        stored = self.resolver.clip(clip_wav, fields.transcript, field)  # as workers read it
        tokenizer_id = None
        if self.encoder is not None:
            encoder = self.encoder()
            tokenizer_id = encoder.tokenizer_id
            if codes is None:
                codes = encoder.encode(stored.samples)
        voice = NewVoice(
            name=name,
            clip_wav=clip_wav,
            duration_s=len(stored.samples) / SAMPLE_RATE,
            transcript=fields.transcript,
            description=fields.description,
            consent=fields.consent,
            source=source,
            codes=codes,
            tokenizer_id=tokenizer_id,
        )
        return self.store.create(voice, overwrite=fields.overwrite)

    def stored_codes(self, clip: ReferenceClip, encoder: Encoder) -> torch.Tensor | None:
        """A library clip's own codes, if they are for this tokenizer and this very clip."""
        voice = clip.library
        if voice is None or voice.codes_path is None or not voice.codes_path.is_file():
            return None
        try:
            record = torch.load(voice.codes_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torn or foreign: encode again (and rewrite it)
            log.warning("codes of voice %s unreadable: %s", voice.name, error)
            return None
        if not isinstance(record, dict) or record.get("tokenizer") != encoder.tokenizer_id:
            return None
        if record.get("clip") != clip.clip_digest:
            return None  # the voice was replaced since these codes were written
        codes = record.get("codes")
        problem = check_codes(codes, encoder.shape)
        if problem is not None:
            log.warning("codes of voice %s %s; encoding again", voice.name, problem)
            return None
        assert isinstance(codes, torch.Tensor)
        return codes

    async def _clip_bytes(self, fields: VoiceFields, clip: bytes | None) -> bytes | None:
        """The clip's bytes; None for a take's (it has its own)."""
        given = [clip, fields.audio_base64, fields.audio_url, fields.take_id]
        if sum(item is not None for item in given) != 1:
            raise RequestError(
                "audio", "give exactly one clip: a file, audio_base64, audio_url or take_id"
            )
        if fields.take_id is not None:
            return None
        if clip is not None:
            return clip
        if fields.audio_base64 is not None:
            return self.resolver.decode_base64(fields.audio_base64, "audio_base64")
        assert fields.audio_url is not None
        return await outbound.download(fields.audio_url, "audio_url", self.settings)
