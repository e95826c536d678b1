"""Where the checkpoints live, and whether a directory really holds one.

`MODEL_PATH` is the generation model's directory and `TOKENIZER_PATH` the audio
tokenizer's; both are plain transformers checkpoints loaded with `from_pretrained`.
`check_checkpoints` fails early with a message that says what is missing and how to get it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError
from .settings import Settings

MODEL_TYPE = "higgs_audio_v2"
TOKENIZER_TYPE = "higgs_audio_v2_tokenizer"
MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Checkpoints:
    model_path: Path
    tokenizer_path: Path


def _how_to_get(variable: str, path: Path, repo: str) -> str:
    return (
        f"Set {variable} to a {repo} checkpoint in transformers format, or fetch it with "
        f"`hf download {repo} --local-dir {path}`. To try the API offline, make a tiny "
        "random model with `higgs-runpod make-tiny-model DIR` and set MODEL_PATH=DIR/model "
        "and TOKENIZER_PATH=DIR/tokenizer."
    )


def _check_dir(variable: str, path: Path, model_type: str, repo: str, extra: tuple[str, ...]):
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{variable}={path} does not exist. {_how_to_get(variable, path, repo)}"
        )
    config_file = path / "config.json"
    try:
        found_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError):
        found_type = None
        missing = "config.json is missing or unreadable"
    else:
        missing = f"config.json says model_type={found_type!r}, expected {model_type!r}"
    if found_type != model_type:
        raise ModelNotFoundError(
            f"{variable}={path} is not a {repo} checkpoint: {missing}. "
            f"{_how_to_get(variable, path, repo)}"
        )
    absent = [name for name in extra if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        absent.append("*.safetensors weights")
    if absent:
        raise ModelNotFoundError(
            f"{variable}={path} is incomplete: missing {', '.join(absent)}. "
            f"{_how_to_get(variable, path, repo)}"
        )


def check_checkpoints(settings: Settings) -> Checkpoints:
    """Return the checkpoint directories, or raise `ModelNotFoundError` saying what's wrong."""
    _check_dir("MODEL_PATH", settings.model_path, MODEL_TYPE, MODEL_REPO, TEXT_TOKENIZER_FILES)
    _check_dir("TOKENIZER_PATH", settings.tokenizer_path, TOKENIZER_TYPE, TOKENIZER_REPO, ())
    return Checkpoints(settings.model_path, settings.tokenizer_path)
