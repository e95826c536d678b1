"""Checkpoints on the volume: first download, many workers at once, crashes, corruption, offline.

The real huggingface_hub client downloads from tests/support/hub_server.py on loopback (HF_ENDPOINT
points at it), which serves the tiny checkpoint and counts every request and byte. Workers
are separate processes running `higgs-runpod download` or `higgs-runpod serve`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from higgs_runpod.errors import InsufficientSpaceError, ModelNotFoundError
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.weights.checkpoints import check_dir, checkpoint_specs
from higgs_runpod.weights.download import Manifest, file_problems
from higgs_runpod.weights.model_store import MARKER, ensure_checkpoints, read_marker
from support.hub_server import HubServer

MODEL_REPO = "bosonai/higgs-audio-v2-generation-3B-base"
TOKENIZER_REPO = "bosonai/higgs-audio-v2-tokenizer"


def volume_env(volume: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "MODEL_PATH": str(volume / "bosonai" / "model"),
        "TOKENIZER_PATH": str(volume / "bosonai" / "tokenizer"),
        "HF_ENDPOINT": endpoint,
        "HF_CACHED_MODELS_PATH": str(volume / "huggingface-cache" / "hub"),
        "DEVICE": "cpu",
        **extra,
    }


def volume_settings(volume: Path, hub: HubServer, **extra: str) -> Settings:
    return load_settings(volume_env(volume, hub.url, **extra))


def run_cli(env: dict[str, str], *args: str, tmp: Path) -> subprocess.Popen:
    """`higgs-runpod ARGS` in a fresh process, with a private HF_HOME and no token."""
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT")}
    full_env = {**base, "HF_HOME": str(tmp / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    command = [sys.executable, "-m", "higgs_runpod.tools.cli", *args]
    return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out.decode(), err.decode()


def wait_until_served(hub: HubServer, process: subprocess.Popen, served: int) -> None:
    """Return once the hub has served `served` bytes, while `process` still runs."""
    deadline = time.monotonic() + 60
    while hub.counters.bytes_served < served:
        assert process.poll() is None, finish(process)
        assert time.monotonic() < deadline
        time.sleep(0.02)


def resolve_gets(hub: HubServer) -> dict[tuple[str, str], int]:
    return dict(hub.counters.file_gets)


def check_checkpoints(settings: Settings) -> None:
    """Both configured directories look loadable (the model's is checked first)."""
    for spec in checkpoint_specs(settings):
        check_dir(spec)


def assert_verified(settings: Settings) -> None:
    check_checkpoints(settings)
    for path in (settings.model_path, settings.tokenizer_path):
        assert path is not None
        marker = read_marker(path)
        assert marker is not None, f"{path} has no completion marker"
        assert not file_problems(path, Manifest.from_json(marker["manifest"]).files)


def test_first_download_then_no_hub_request_and_the_hub_may_go_away(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    settings = volume_settings(tmp_path, tiny_hub)
    _, (model, tokenizer) = ensure_checkpoints(settings)
    assert (model.source, tokenizer.source) == ("downloaded", "downloaded")
    assert_verified(settings)
    marker = read_marker(settings.model_path)
    assert marker["manifest"]["repo"] == MODEL_REPO
    assert marker["manifest"]["commit"] == tiny_hub.repos[MODEL_REPO].commit
    weights = next(f for f in marker["manifest"]["files"] if f["path"] == "model.safetensors")
    assert weights["sha256"] == tiny_hub.repos[MODEL_REPO].files["model.safetensors"].sha256
    assert "revision main" in model.describe() and "downloaded" in model.describe()
    assert sorted(os.listdir(settings.model_path.parent)) == ["model", "tokenizer"]

    tiny_hub.reset_counters()
    _, readies = ensure_checkpoints(settings)
    assert [ready.source for ready in readies] == ["volume", "volume"]
    assert tiny_hub.counters.requests == [], "a complete checkpoint needs no hub request"

    tiny_hub.stop()
    worker = Worker(SpeechService(settings))  # the real engine loads what was downloaded
    result = asyncio.run(worker.handle({"id": "t", "input": {"text": "Hi.", "seed": 1}}))
    assert "error" not in result and result["audio_base64"]


def test_four_workers_at_once_download_each_file_once(
    tiny_hub: HubServer, tiny_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    tiny_hub.bytes_per_second = 400_000  # slow enough that the four overlap
    env = volume_env(tmp_path, tiny_hub.url)
    workers = [run_cli(env, "download", tmp=tmp_path) for _ in range(4)]
    results = [finish(worker) for worker in workers]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], results
    gets = resolve_gets(tiny_hub)
    hosted = {
        (repo.repo_id, name): file.size
        for repo in tiny_hub.repos.values()
        for name, file in repo.files.items()
    }
    assert gets == dict.fromkeys(hosted, 1), "each file fetched exactly once"
    assert tiny_hub.counters.bytes_served == sum(hosted.values())
    assert sum("waiting for" in err for _, _, err in results) >= 1, "others waited"
    assert sum("downloaded," in out for _, out, _ in results) >= 1
    settings = load_settings(env)
    assert_verified(settings)
    SpeechService(settings).engine.load()


def test_a_download_killed_midway_is_finished_by_the_next_worker(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    tiny_hub.bytes_per_second = 200_000
    env = volume_env(tmp_path, tiny_hub.url)
    settings = load_settings(env)
    model_bytes = sum(file.size for file in tiny_hub.repos[MODEL_REPO].files.values())
    first = run_cli(env, "download", tmp=tmp_path)
    wait_until_served(tiny_hub, first, model_bytes + 300_000)  # inside the tokenizer weights
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not settings.tokenizer_path.exists(), "a partial download is never visible"
    with pytest.raises(ModelNotFoundError, match="TOKENIZER_PATH"):
        check_checkpoints(settings)

    tiny_hub.bytes_per_second = None
    start = time.monotonic()
    code, out, err = finish(run_cli(env, "download", tmp=tmp_path))
    assert code == 0, err
    assert time.monotonic() - start < 30, "the dead owner's lock is taken over at once"
    assert "volume" in out.splitlines()[0] and "downloaded" in out.splitlines()[1]
    gets = resolve_gets(tiny_hub)
    assert gets.pop((TOKENIZER_REPO, "model.safetensors")) == 2, "the file in flight restarts"
    assert set(gets.values()) == {1}, "finished files are kept"
    assert_verified(settings)
    assert not list(settings.tokenizer_path.parent.glob(".tokenizer.*")), "no leftovers"


def test_a_corrupted_or_truncated_file_is_detected_and_refetched(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    settings = volume_settings(tmp_path, tiny_hub)
    ensure_checkpoints(settings)
    weights = settings.tokenizer_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    tokenizer_json = settings.model_path / "tokenizer.json"
    tokenizer_json.write_bytes(tokenizer_json.read_bytes()[:-10])
    tiny_hub.reset_counters()

    _, (model, tokenizer) = ensure_checkpoints(settings)
    assert (model.source, tokenizer.source) == ("repaired", "repaired")
    gets = resolve_gets(tiny_hub)
    assert gets == {(MODEL_REPO, "tokenizer.json"): 1, (TOKENIZER_REPO, "model.safetensors"): 1}
    assert_verified(settings)


def test_a_file_corrupted_in_transfer_is_fetched_again(tiny_hub: HubServer, tmp_path: Path) -> None:
    tiny_hub.corrupt_next.add((TOKENIZER_REPO, "model.safetensors"))
    settings = volume_settings(tmp_path, tiny_hub)
    ensure_checkpoints(settings)
    assert resolve_gets(tiny_hub)[(TOKENIZER_REPO, "model.safetensors")] == 2
    assert_verified(settings)


def test_too_little_free_space_is_a_clear_error(tiny_hub: HubServer, tmp_path: Path) -> None:
    tiny_hub.advertised_sizes[(MODEL_REPO, "model.safetensors")] = 2**55
    with pytest.raises(InsufficientSpaceError, match=r"MODEL_PATH=.*needs .* GB more .* free"):
        ensure_checkpoints(volume_settings(tmp_path, tiny_hub))
    assert not resolve_gets(tiny_hub), "nothing was downloaded"


def test_a_hand_filled_directory_is_used_as_is(
    tiny_hub: HubServer, tiny_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = volume_settings(tmp_path, tiny_hub)
    shutil.copytree(tiny_checkpoint[0], settings.model_path)
    shutil.copytree(tiny_checkpoint[1], settings.tokenizer_path)
    _, readies = ensure_checkpoints(settings)
    assert [ready.source for ready in readies] == ["hand-filled", "hand-filled"]
    assert "filled by hand" in readies[0].describe()
    assert tiny_hub.counters.requests == []
    assert not (settings.model_path / MARKER).exists()


def test_a_broken_hand_filled_directory_is_refused_not_overwritten(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    settings = volume_settings(tmp_path, tiny_hub)
    settings.model_path.mkdir(parents=True)
    (settings.model_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelNotFoundError, match="will not overwrite it"):
        ensure_checkpoints(settings)
    assert (settings.model_path / "notes.txt").read_text() == "mine"


def test_runpod_cached_models_are_used_when_they_hold_the_repo(
    tiny_hub: HubServer, tiny_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = volume_settings(tmp_path, tiny_hub)
    repo_dir = settings.hf_cached_models_path / "models--bosonai--higgs-audio-v2-tokenizer"
    snapshot = repo_dir / "snapshots" / ("ab" * 20)
    shutil.copytree(tiny_checkpoint[1], snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("ab" * 20)
    checkpoints, (model, tokenizer) = ensure_checkpoints(settings)
    assert (model.source, tokenizer.source) == ("downloaded", "runpod-cache")
    assert checkpoints.tokenizer_path == snapshot
    assert all(repo == MODEL_REPO for repo, _ in resolve_gets(tiny_hub))


def test_pinning_the_downloaded_commit_needs_no_hub(tiny_hub: HubServer, tmp_path: Path) -> None:
    ensure_checkpoints(volume_settings(tmp_path, tiny_hub))
    tiny_hub.reset_counters()
    commit = tiny_hub.repos[MODEL_REPO].commit
    _, (model, _) = ensure_checkpoints(volume_settings(tmp_path, tiny_hub, MODEL_REVISION=commit))
    assert model.source == "volume"
    assert tiny_hub.counters.requests == []


def test_default_paths_follow_the_repos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    settings = load_settings({"MODEL_REPO": "org/other"})
    if not Path("/runpod-volume").is_dir():
        assert settings.model_path == tmp_path / "higgs-runpod" / "org" / "other"
        assert settings.tokenizer_path == tmp_path / "higgs-runpod" / TOKENIZER_REPO


def test_hub_errors_fail_the_start_quickly_with_a_clear_message(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    tiny_hub.repos[MODEL_REPO].token = "hf_secret_for_tests"
    cases = {
        "missing repo": ({"MODEL_REPO": "bosonai/no-such-model"}, "bosonai/no-such-model was not"),
        "gated, no token": ({}, "is gated.*HF_TOKEN"),
        "bad revision": ({"MODEL_REVISION": "v9"}, "no revision 'v9'.*MODEL_REVISION"),
    }
    for name, (extra, message) in cases.items():
        env = volume_env(tmp_path / name, tiny_hub.url, **extra)
        code, out, err = finish(run_cli(env, "download", tmp=tmp_path), timeout=60)
        assert code == 1, (name, err)
        assert __import__("re").search(message, err), (name, err)

    env = volume_env(tmp_path / "token", tiny_hub.url, HF_TOKEN="hf_secret_for_tests")
    code, out, err = finish(run_cli(env, "download", tmp=tmp_path), timeout=60)
    assert code == 0, err
    assert "hf_secret_for_tests" not in out + err

    tiny_hub.stop()  # the hub is down and the volume is empty: `serve` must fail, not hang
    env = volume_env(tmp_path / "down", tiny_hub.url)
    start = time.monotonic()
    code, _, err = finish(run_cli(env, "serve", "--port", "9", tmp=tmp_path), timeout=120)
    assert code == 1, err
    assert "cannot start: could not download" in err and "HF_ENDPOINT" in err
    assert time.monotonic() - start < 90
    assert "Traceback" not in err
    assert json.dumps(err)  # printable


# --- check_checkpoints: clear messages for missing or wrong directories ----------------


def check(model: Path, tokenizer: Path) -> None:
    check_checkpoints(load_settings({"MODEL_PATH": str(model), "TOKENIZER_PATH": str(tokenizer)}))


def test_tiny_checkpoint_passes(tiny_checkpoint: tuple[Path, Path]) -> None:
    check(*tiny_checkpoint)


def test_missing_directory_says_how_to_get_weights(tiny_checkpoint, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        check(tmp_path / "nope", tiny_checkpoint[1])
    message = str(caught.value)
    assert f"MODEL_PATH={tmp_path / 'nope'} does not exist" in message
    assert "higgs-runpod download" in message
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


# --- races on a shared volume ----------------------------------------------------------------


def test_another_revision_in_the_same_model_path_is_refused_not_replaced(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    env = volume_env(tmp_path, tiny_hub.url)
    code, _, err = finish(run_cli(env, "download", tmp=tmp_path))
    assert code == 0, err
    settings = load_settings(env)
    first_commit = tiny_hub.repos[MODEL_REPO].commit
    published = (settings.model_path / MARKER).read_bytes()
    tiny_hub.repos[MODEL_REPO].commit = "d" * 40  # a new revision on the hub
    tiny_hub.reset_counters()

    other = {**env, "MODEL_REVISION": "d" * 40}
    code, _, err = finish(run_cli(other, "download", tmp=tmp_path))
    assert code == 1
    assert f"MODEL_PATH={settings.model_path} holds {MODEL_REPO} revision main" in err
    assert first_commit in err and f"wants {MODEL_REPO} revision {'d' * 40}" in err
    assert "Traceback" not in err
    assert (settings.model_path / MARKER).read_bytes() == published, "the live copy was replaced"
    assert tiny_hub.counters.file_gets == {}, "nothing was downloaded"
    assert_verified(settings)

    separate = {**other, "MODEL_PATH": str(tmp_path / "bosonai" / "model-d")}
    code, _, err = finish(run_cli(separate, "download", tmp=tmp_path))
    assert code == 0, err  # its own path: both revisions side by side
    assert read_marker(settings.model_path)["manifest"]["commit"] == first_commit


def test_a_holder_that_stalled_and_lost_the_lock_neither_writes_into_nor_publishes_over_the_next(
    tiny_hub: HubServer, tmp_path: Path
) -> None:
    """A stalls inside the tokenizer's weights (SIGSTOP) for longer than the lock's stale
    limit; B takes the lock over, resumes A's files and publishes. When A resumes, what it
    still writes must not reach B's checkpoint, and A must fail rather than publish."""
    tiny_hub.bytes_per_second = 200_000
    env = volume_env(tmp_path, tiny_hub.url, DOWNLOAD_LOCK_STALE_S="5")
    settings = load_settings(env)
    model_bytes = sum(file.size for file in tiny_hub.repos[MODEL_REPO].files.values())
    first = run_cli(env, "download", tmp=tmp_path)
    wait_until_served(tiny_hub, first, model_bytes + 200_000)  # inside the tokenizer weights
    first.send_signal(signal.SIGSTOP)
    try:
        code, _, err = finish(run_cli(env, "download", tmp=tmp_path))
    finally:
        first.send_signal(signal.SIGCONT)
    assert code == 0, err
    assert "waiting for" in err
    assert_verified(settings)
    weights = settings.tokenizer_path / "model.safetensors"
    published = weights.read_bytes()

    code, _, err = finish(first)
    assert code == 1, err
    assert "another worker took over the download lock" in err, err
    assert weights.read_bytes() == published, "the stalled holder wrote into the published file"
    assert_verified(settings)
    assert not list(settings.tokenizer_path.parent.glob(".tokenizer.*")), "no leftovers"
