"""Prompt building: normalised text and resolved voices in, a chat conversation out, and
the conversation rendered into the model's inputs (`render_prompt`).

The conversation uses the roles documented for Higgs Audio v2 in transformers (system,
scene, user, assistant) and is rendered later by the checkpoint's own chat template, so
the real checkpoint and a tiny one go through the same path:

    system     "Generate audio following instruction." (or the multi-speaker prompt)
    scene      scene description; "SPEAKERn: <description>" lines; "SPEAKERn:" + clip
    user       reference transcript   } one pair when a single voice is cloned
    assistant  reference clip         }
    user       the text to speak
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from higgs_runpod.request.schema import SPEAKER_TAG
from higgs_runpod.request.voices import ReferenceClip, ResolvedVoice, VoiceDescription

if TYPE_CHECKING:
    from transformers import BatchFeature, HiggsAudioV2Processor

SINGLE_SPEAKER_SYSTEM = "Generate audio following instruction."
MULTI_SPEAKER_SYSTEM = (
    "You are an AI assistant designed to convert text into speech.\n"
    "If the user's message includes a [SPEAKER*] tag, do not read out the tag and generate "
    "speech for the following text, using the specified voice.\n"
    "If no speaker tag is present, select a suitable voice on your own."
)
SMART_VOICES = ("feminine", "masculine")

_FULL_WIDTH = str.maketrans(
    {"，": ",", "。": ".", "：": ":", "；": ";", "？": "?", "！": "!", "（": "(", "）": ")",
     "【": "[", "】": "]", "《": '"', "》": '"', "“": '"', "”": '"', "‘": "'", "’": "'",
     "、": ","}
)  # fmt: skip
_SOUND_EVENTS = {
    "laugh": "Laughter",
    "music": "Music",
    "applause": "Applause",
    "cheering": "Cheering",
    "cough": "Cough",
}
_SPANNED_EVENTS = {"humming": "Humming", "music": "Music", "sing": "Singing"}
_ENDS_SENTENCE = (".", "!", "?", ",", ";", ":", '"', "'", "…", "</SE>", "</SE_e>", "</SE_s>")


def normalize_text(text: str) -> str:
    """Upstream Higgs Audio v2 text normalisation (see the README for the tag list)."""
    text = text.translate(_FULL_WIDTH)
    text = text.replace("(", " ").replace(")", " ")
    text = text.replace("°F", " degrees Fahrenheit").replace("°C", " degrees Celsius")
    for tag, event in _SOUND_EVENTS.items():
        text = text.replace(f"[{tag}]", f"<SE>[{event}]</SE>")
    for tag, event in _SPANNED_EVENTS.items():
        text = text.replace(f"[{tag} start]", f"<SE_s>[{event}]</SE_s>")
        text = text.replace(f"[{tag} end]", f"<SE_e>[{event}]</SE_e>")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    text = "\n".join(line for line in lines if line)
    if text and not text.endswith(_ENDS_SENTENCE):
        text += "."
    return text


def _text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def _audio(clip: ReferenceClip) -> dict[str, Any]:
    """Its codes when the worker has them already (library or cache), else its samples."""
    if clip.codes is not None:
        return {"type": "audio", "codes": clip.codes}
    return {"type": "audio", "audio": clip.samples}


def _speaker_key(tag: str) -> int:
    return int(tag.removeprefix("SPEAKER"))


def build_conversation(
    text: str,
    *,
    scene: str | None = None,
    voice: ResolvedVoice | None = None,
    speakers: dict[str, ResolvedVoice] | None = None,
    history: Sequence[tuple[str, torch.Tensor]] = (),
) -> list[dict[str, Any]]:
    """The chat conversation for one request; texts are normalised here.

    `history` holds earlier chunks of a long text as (text, codes): each becomes a user
    turn and an assistant turn with its audio codes, so the voice carries on.
    """
    text = normalize_text(text)
    spoken = [text, *(normalize_text(earlier) for earlier, _ in history)]
    tags = sorted(set(SPEAKER_TAG.findall(" ".join(spoken))), key=_speaker_key)
    system = MULTI_SPEAKER_SYSTEM if tags or speakers else SINGLE_SPEAKER_SYSTEM
    scene_items = [_text(scene)] if scene else []
    clone_turns: list[dict[str, Any]] = []

    if speakers:
        for tag in sorted(speakers, key=_speaker_key):
            chosen = speakers[tag]
            if isinstance(chosen, VoiceDescription):
                scene_items.append(_text(f"{tag}: {chosen.text}"))
            else:
                scene_items += [_text(f"{tag}:"), _audio(chosen)]
    elif tags:
        scene_items += [_text(f"{tag}: {SMART_VOICES[_speaker_key(tag) % 2]}") for tag in tags]
    elif isinstance(voice, VoiceDescription):
        scene_items.append(_text(f"SPEAKER0: {voice.text}"))
    elif isinstance(voice, ReferenceClip):
        clone_turns = [
            {"role": "user", "content": [_text(normalize_text(voice.transcript))]},
            {"role": "assistant", "content": [_audio(voice)]},
        ]

    context_turns = [
        turn
        for earlier, codes in history
        for turn in (
            {"role": "user", "content": [_text(normalize_text(earlier))]},
            {"role": "assistant", "content": [{"type": "audio", "codes": codes}]},
        )
    ]
    conversation = [{"role": "system", "content": [_text(system)]}]
    if scene_items:
        conversation.append({"role": "scene", "content": scene_items})
    return [
        *conversation,
        *clone_turns,
        *context_turns,
        {"role": "user", "content": [_text(text)]},
    ]


def render_prompt(
    processor: HiggsAudioV2Processor,
    conversation: list[dict[str, Any]],
    clip_codes: Callable[[np.ndarray], torch.Tensor],
    device: torch.device,
) -> BatchFeature:
    """Render the chat template and put each clip's delayed codes where its placeholder is.

    The same steps as the processor's own `__call__`, except that clips given as codes
    are used as they are instead of being decoded and encoded again; clips given as
    samples are encoded by `clip_codes` (the engine's, through the voice cache).
    """
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    clips = [item for m in conversation for item in m["content"] if item["type"] == "audio"]
    pieces = text.split(processor.audio_token)
    if len(pieces) != len(clips) + 1:
        raise ValueError("the chat template placed a different number of clips")
    delayed = [
        _delayed(processor, clip["codes"] if "codes" in clip else clip_codes(clip["audio"]), device)
        for clip in clips
    ]
    text = pieces[0] + "".join(
        processor.get_audio_tokens(len(steps)) + piece
        for steps, piece in zip(delayed, pieces[1:], strict=True)
    )
    inputs = processor.tokenizer(text, return_tensors="pt", add_special_tokens=False)
    if delayed:
        audio_input_ids = torch.cat(delayed).unsqueeze(0)
        inputs["audio_input_ids"] = audio_input_ids
        inputs["audio_input_ids_mask"] = torch.ones(audio_input_ids.shape[:2], dtype=torch.bool)
    return inputs.to(device)


def _delayed(
    processor: HiggsAudioV2Processor, codes: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Codes (frames x codebooks) -> stream BOS + codes + EOS in the delay pattern."""
    codes = codes.T.unsqueeze(0).to(device)
    bos = codes.new_full((1, codes.shape[1], 1), processor.audio_stream_bos_id)
    eos = codes.new_full((1, codes.shape[1], 1), processor.audio_stream_eos_id)
    return processor.build_delay_pattern(torch.cat([bos, codes, eos], dim=2))[0].T
