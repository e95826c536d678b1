"""Checkpoint directories: clear messages for missing or wrong ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from higgs_runpod.errors import ModelNotFoundError
from higgs_runpod.model_store import check_checkpoints
from higgs_runpod.settings import load_settings


def check(model: Path, tokenizer: Path) -> None:
    check_checkpoints(load_settings({"MODEL_PATH": str(model), "TOKENIZER_PATH": str(tokenizer)}))


def test_tiny_checkpoint_passes(tiny_checkpoint: tuple[Path, Path]) -> None:
    check(*tiny_checkpoint)


def test_missing_directory_says_how_to_get_weights(tiny_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        check(tmp_path / "nope", tiny_checkpoint[1])
    message = str(caught.value)
    assert f"MODEL_PATH={tmp_path / 'nope'} does not exist" in message
    assert "hf download bosonai/higgs-audio-v2-generation-3B-base" in message
    assert "make-tiny-model" in message


def test_swapped_directories_are_named(tiny_checkpoint: tuple[Path, Path]) -> None:
    model, tokenizer = tiny_checkpoint
    with pytest.raises(ModelNotFoundError, match="expected 'higgs_audio_v2'"):
        check(tokenizer, model)


def test_missing_weights_and_tokenizer_files(tiny_checkpoint, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint[0], model)
    (model / "model.safetensors").unlink()
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"missing tokenizer.json, \*.safetensors"):
        check(model, tiny_checkpoint[1])


def test_unreadable_config(tiny_checkpoint, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tiny_checkpoint[1], tokenizer)
    (tokenizer / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFoundError, match=r"config\.json is missing or unreadable"):
        check(tiny_checkpoint[0], tokenizer)
    (tokenizer / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFoundError, match="model_type='llama'"):
        check(tiny_checkpoint[0], tokenizer)
