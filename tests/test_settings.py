"""Settings from the environment: the volume's defaults and the client commands' keys."""

from __future__ import annotations

from pathlib import Path

from higgs_runpod.container import bootstrap, health
from higgs_runpod.settings import load_client_settings, load_settings


def test_paths_default_onto_the_volume_path_when_it_exists(tmp_path: Path) -> None:
    settings = load_settings({"VOLUME_PATH": str(tmp_path)})
    assert settings.voices_path == tmp_path / "voices"
    assert settings.voice_cache_path == tmp_path / "voice-cache"
    assert settings.hf_cached_models_path == tmp_path / "huggingface-cache" / "hub"
    assert settings.model_path == tmp_path / settings.model_repo
    assert settings.tokenizer_path == tmp_path / settings.tokenizer_repo


def test_without_a_volume_paths_stay_local(tmp_path: Path) -> None:
    settings = load_settings({"VOLUME_PATH": str(tmp_path / "not-mounted")})
    assert settings.voices_path == Path("voices")
    assert settings.voice_cache_path is None
    assert settings.model_path is not None
    assert not settings.model_path.is_relative_to(tmp_path)
    assert settings.model_path.parts[-3] == "higgs-runpod"  # the user's cache


def test_the_worker_and_the_container_share_their_defaults() -> None:
    settings = load_settings({})
    bootstrap_volume = bootstrap.load_config({"RUNTIME_MODE": "image"}).volume
    assert settings.volume_path == Path(bootstrap.DEFAULT_VOLUME_PATH) == bootstrap_volume
    assert settings.ready_file == health.ready_file({})


def test_client_keys_come_from_the_environment_and_blank_means_unset() -> None:
    client = load_client_settings({"RUNPOD_API_KEY": "rp-key", "HIGGS_API_KEY": " "})
    assert (client.runpod_key, client.higgs_key) == ("rp-key", None)
    assert "rp-key" not in repr(client)
    assert load_client_settings({}).runpod_api_url == "https://api.runpod.io"
