"""Text normalisation and conversation building (the roles documented for Higgs Audio v2)."""

from __future__ import annotations

import numpy as np
import pytest

from higgs_runpod.request.prompts import (
    MULTI_SPEAKER_SYSTEM,
    SINGLE_SPEAKER_SYSTEM,
    build_conversation,
    normalize_text,
)
from higgs_runpod.request.voices import ReferenceClip, VoiceDescription

CLIP = ReferenceClip(np.zeros(24_000, dtype=np.float32), "Reference words")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello world", "Hello world."),
        ("Done!", "Done!"),
        ("你好，世界。", "你好,世界."),
        ("It is 75°F (warm)", "It is 75 degrees Fahrenheit warm."),
        ("Ha [laugh] ha", "Ha <SE>[Laughter]</SE> ha."),
        ("[applause]", "<SE>[Applause]</SE>"),
        ("[humming start] la [humming end]", "<SE_s>[Humming]</SE_s> la <SE_e>[Humming]</SE_e>"),
        ("  many   spaces \n\n  and lines ", "many spaces\nand lines."),
        ("[SPEAKER0] Hi. [SPEAKER1] Hey", "[SPEAKER0] Hi. [SPEAKER1] Hey."),
    ],
)  # fmt: skip
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def _roles(conversation: list[dict]) -> list[str]:
    return [message["role"] for message in conversation]


def _texts(message: dict) -> list[str]:
    return [item["text"] for item in message["content"] if item["type"] == "text"]


def test_smart_voice_is_system_then_user() -> None:
    conversation = build_conversation("Hello")
    assert _roles(conversation) == ["system", "user"]
    assert _texts(conversation[0]) == [SINGLE_SPEAKER_SYSTEM]
    assert _texts(conversation[1]) == ["Hello."]


def test_clone_adds_reference_pair_before_the_text() -> None:
    conversation = build_conversation("Hello", scene="A quiet room", voice=CLIP)
    assert _roles(conversation) == ["system", "scene", "user", "assistant", "user"]
    assert _texts(conversation[2]) == ["Reference words."]
    assert conversation[3]["content"][0]["audio"] is CLIP.samples


def test_described_voice_goes_into_the_scene() -> None:
    conversation = build_conversation("Hello", voice=VoiceDescription("a deep voice"))
    assert _texts(conversation[1]) == ["SPEAKER0: a deep voice"]


def test_tagged_dialogue_without_speakers_uses_smart_voices() -> None:
    conversation = build_conversation("[SPEAKER1] Hi. [SPEAKER0] Hello.")
    assert _texts(conversation[0]) == [MULTI_SPEAKER_SYSTEM]
    assert _texts(conversation[1]) == ["SPEAKER0: feminine", "SPEAKER1: masculine"]


def test_speakers_list_clips_and_descriptions_in_the_scene() -> None:
    speakers = {"SPEAKER1": VoiceDescription("calm"), "SPEAKER0": CLIP}
    conversation = build_conversation("[SPEAKER0] Hi. [SPEAKER1] Hello.", speakers=speakers)
    assert _roles(conversation) == ["system", "scene", "user"]
    kinds = [item["type"] for item in conversation[1]["content"]]
    assert kinds == ["text", "audio", "text"]
    assert _texts(conversation[1]) == ["SPEAKER0:", "SPEAKER1: calm"]
