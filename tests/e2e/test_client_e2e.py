"""The client end to end against a live `higgs-runpod serve` (RunPod's local API server with
the tiny model): inline, S3 (moto) and a streaming endpoint, by the CLI in a subprocess
and by the Python API."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import soundfile

from higgs_runpod.errors import JobFailed
from higgs_runpod.tools.client import speak
from support.cli import run_cli
from support.s3store import S3_KEY_ID, S3_SECRET
from support.servers import LocalServer


def test_cli_against_local_server_inline(local_server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "hello.flac"
    result = run_cli("Hello there.", "-o", str(out), "--url", local_server.url, "--seed", "3",
                     "--max-new-tokens", "40")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    samples, rate = soundfile.read(out)
    assert rate == 24_000
    assert soundfile.info(out).format == "FLAC"
    assert len(samples) > 0


def test_python_api_against_local_server_failed_job(
    local_server: LocalServer, tmp_path: Path
) -> None:
    with pytest.raises(JobFailed) as error:
        speak({"text": "Hi", "temperature": 9.0}, tmp_path / "x.wav", url=local_server.url)
    assert error.value.status == "FAILED"
    assert error.value.message.startswith("temperature:")


def test_cli_against_local_server_with_s3(s3_server: LocalServer, tmp_path: Path) -> None:
    out = tmp_path / "hello.mp3"
    result = run_cli("Hello bucket.", "-o", str(out), "--url", s3_server.url, "--seed", "3",
                     "--max-new-tokens", "40")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "from s3://audio/higgs-runpod/test-" in result.stdout
    import av

    with av.open(str(out)) as container:
        assert container.format.name == "mp3"
        assert sum(frame.samples for frame in container.decode(audio=0)) > 0
    everything = result.stdout + result.stderr + s3_server.log()
    for secret in (S3_SECRET, S3_KEY_ID, "X-Amz-Signature", "X-Amz-Credential"):
        assert secret not in everything


def test_python_api_inline_on_s3_server(s3_server: LocalServer, tmp_path: Path) -> None:
    output = speak(
        {"text": "Inline please.", "output": "inline", "max_new_tokens": 40, "format": "wav"},
        tmp_path / "x.wav",
        url=s3_server.url,
    )
    assert output["delivery"] == "inline"
    data, rate = soundfile.read(io.BytesIO((tmp_path / "x.wav").read_bytes()))
    assert rate == 24_000
    assert len(data) / rate == pytest.approx(output["duration_s"], abs=1e-3)


def test_client_joins_a_stream_from_a_streaming_endpoint(streaming_server, tmp_path: Path) -> None:
    """Against the generator handler, outputs are lists; the client writes one file."""
    job = {"text": "Joined by the client.", "seed": 2, "max_new_tokens": 50, "format": "wav"}
    streamed = speak({**job, "stream": True}, tmp_path / "streamed.wav", url=streaming_server.url)
    plain = speak(job, tmp_path / "plain.wav", url=streaming_server.url)
    assert streamed["done"] and streamed["pieces"] > 1
    streamed_audio, rate = soundfile.read(tmp_path / "streamed.wav", dtype="int16")
    plain_audio, _ = soundfile.read(tmp_path / "plain.wav", dtype="int16")
    assert rate == 24_000
    assert len(streamed_audio) == plain["usage"]["audio_frames"] * 960
    # Piecewise decoding differs from one pass by ~1e-9: at most one step of 16-bit rounding.
    assert abs(streamed_audio.astype(int) - plain_audio).max() <= 1
