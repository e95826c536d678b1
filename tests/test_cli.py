"""The `higgs-runpod` command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile

from higgs_runpod.tools.cli import build_parser
from higgs_runpod.tools.cli_requests import synth_input
from support.cli import cli


def test_synth_writes_the_format_of_the_extension(base_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "hello.flac"
    result = cli(
        "synth",
        "Hello there",
        "-o",
        str(out),
        "--voice",
        "alice",
        "--max-new-tokens",
        "30",
        "--seed",
        "5",
        env=base_env,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    info = soundfile.info(out)
    assert (info.format, info.samplerate, info.channels) == ("FLAC", 24_000, 1)
    assert info.duration == pytest.approx((30 - 4) * 0.04)


def test_synth_reports_request_errors(base_env: dict, tmp_path: Path) -> None:
    result = cli("synth", "Hi", "-o", str(tmp_path / "x.wav"), "--voice", "nobody", env=base_env)
    assert result.returncode == 1
    assert "error: voice: unknown voice 'nobody'" in result.stderr
    assert "Traceback" not in result.stderr


def test_synth_input_clones_a_file(tmp_path: Path) -> None:
    clip = tmp_path / "me.wav"
    clip.write_bytes(b"RIFF")
    args = build_parser().parse_args(
        [
            "synth",
            "Hi",
            "-o",
            "out.mp3",
            "--voice-file",
            str(clip),
            "--transcript",
            "Me.",
            "--top-k",
            "20",
        ]
    )
    assert synth_input(args) == {
        "text": "Hi",
        "format": "mp3",
        "voice": {"audio_base64": "UklGRg==", "transcript": "Me."},
        "top_k": 20,
    }
    with pytest.raises(SystemExit, match="cannot tell the format"):
        synth_input(build_parser().parse_args(["synth", "Hi", "-o", "out.xyz"]))


def test_voices_lists_the_library(base_env: dict, tmp_path: Path) -> None:
    assert cli("voices", env=base_env).stdout.startswith("alice\t")
    empty = cli("voices", env={"VOICES_PATH": str(tmp_path)})
    assert f"no voices in {tmp_path}" in empty.stdout


def test_make_tiny_model_says_it_speaks_noise(tmp_path: Path) -> None:
    result = cli("make-tiny-model", str(tmp_path / "tiny"))
    assert result.returncode == 0, result.stderr
    assert "speaks noise" in result.stdout
    assert (tmp_path / "tiny" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "tiny" / "tokenizer" / "config.json").is_file()


def test_make_tiny_model_in_the_published_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args(["make-tiny-model", "--published-layout", str(tmp_path)])
    assert args.func(args) == 0
    assert f"MODEL_PATH={tmp_path / 'model'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["vocab_size"], config["codebook_size"]) == (128256, 1026)
    assert (tmp_path / "tokenizer" / "model.safetensors").is_file()
