"""What a checkpoint is, where it goes, and whether a directory holds a loadable one.

`MODEL_PATH` is the generation model's directory and `TOKENIZER_PATH` the audio tokenizer's;
both are plain transformers checkpoints loaded with `from_pretrained`. `model_store` makes
sure they are there; this module only looks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from higgs_runpod.errors import ModelNotFoundError
from higgs_runpod.settings import Settings

log = logging.getLogger(__name__)

MODEL_TYPE = "higgs_audio_v2"
TOKENIZER_TYPE = "higgs_audio_v2_tokenizer"
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Checkpoints:
    model_path: Path
    tokenizer_path: Path


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint as configured: where it goes, what it is, and where it comes from."""

    variable: str  # the setting that names its directory, for messages
    path: Path
    repo: str
    revision: str
    model_type: str
    required_files: tuple[str, ...]


def checkpoint_specs(settings: Settings) -> tuple[CheckpointSpec, CheckpointSpec]:
    assert settings.model_path is not None and settings.tokenizer_path is not None
    model = CheckpointSpec(
        "MODEL_PATH",
        settings.model_path,
        settings.model_repo,
        settings.model_revision,
        MODEL_TYPE,
        TEXT_TOKENIZER_FILES,
    )
    tokenizer = CheckpointSpec(
        "TOKENIZER_PATH",
        settings.tokenizer_path,
        settings.tokenizer_repo,
        settings.tokenizer_revision,
        TOKENIZER_TYPE,
        (),
    )
    return model, tokenizer


def _how_to_get(spec: CheckpointSpec) -> str:
    return (
        f"Run `higgs-runpod download` (it fetches {spec.repo} into {spec.path}), or set "
        f"{spec.variable} to a {spec.repo} checkpoint in transformers format. To try the API "
        "offline, make a tiny random model with `higgs-runpod make-tiny-model DIR` and set "
        "MODEL_PATH=DIR/model and TOKENIZER_PATH=DIR/tokenizer."
    )


def check_dir(spec: CheckpointSpec, path: Path | None = None) -> None:
    """Raise `ModelNotFoundError` unless `path` (default: the spec's) looks loadable."""
    path = path or spec.path
    variable = f"{spec.variable}={path}"
    if not path.is_dir():
        raise ModelNotFoundError(f"{variable} does not exist. {_how_to_get(spec)}")
    try:
        found_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        found_type = None
        missing = "config.json is missing or unreadable"
    else:
        missing = f"config.json says model_type={found_type!r}, expected {spec.model_type!r}"
    if found_type != spec.model_type:
        raise ModelNotFoundError(
            f"{variable} is not a {spec.repo} checkpoint: {missing}. {_how_to_get(spec)}"
        )
    absent = [name for name in spec.required_files if not (path / name).is_file()]
    if not any(path.glob("*.safetensors")):
        absent.append("*.safetensors weights")
    if absent:
        raise ModelNotFoundError(
            f"{variable} is incomplete: missing {', '.join(absent)}. {_how_to_get(spec)}"
        )


def find_cached_model(cache_root: Path, spec: CheckpointSpec) -> Path | None:
    """The snapshot of `spec.repo` in a Hugging Face hub cache (RunPod's cached models), if any."""
    repo_dir = cache_root / f"models--{spec.repo.replace('/', '--')}"
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / spec.revision
    commit = ref.read_text().strip() if ref.is_file() else spec.revision
    candidate = snapshots / commit
    if not candidate.is_dir():
        found = [entry for entry in snapshots.iterdir() if entry.is_dir()]
        if spec.revision != "main" or len(found) != 1:
            return None
        candidate = found[0]  # RunPod caches one snapshot per repo, the default branch's
    try:
        check_dir(spec, candidate)
    except ModelNotFoundError as error:
        log.warning("ignoring RunPod's cached copy of %s: %s", spec.repo, error)
        return None
    return candidate
