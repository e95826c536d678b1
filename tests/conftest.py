"""Shared fixtures: a tiny real checkpoint, settings pointing at it, an engine and a worker on
it, S3 stores and a hub on loopback. The helpers they use live in tests/support/.

Everything runs on the CPU with the real transformers classes; the only network is
loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.synthesis.engine import Engine
from higgs_runpod.weights.tiny import make_tiny_model
from higgs_runpod.weights.tiny_published import make_published_layout_model
from support.audio import make_wav
from support.hub_server import HubServer, host_directory
from support.s3store import S3_KEY_ID, S3_SECRET, AuthStore, StrictStore
from support.servers import free_port


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MODEL_PATH, TOKENIZER_PATH) of a tiny random checkpoint built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def published_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(MODEL_PATH, TOKENIZER_PATH) of a tiny checkpoint in the published checkpoint's layout
    (real token ids, 8 codebooks of 1024 codes), built once per session."""
    return make_published_layout_model(tmp_path_factory.mktemp("published"))


@pytest.fixture(scope="session")
def voices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A voice library with one preset, `alice`."""
    directory = tmp_path_factory.mktemp("voices")
    (directory / "alice.wav").write_bytes(make_wav(seconds=1.5))
    (directory / "alice.txt").write_text("Hello, I am Alice.\n")
    return directory


@pytest.fixture(scope="session")
def base_env(tiny_checkpoint: tuple[Path, Path], voices_dir: Path) -> dict[str, str]:
    model_path, tokenizer_path = tiny_checkpoint
    return {
        "MODEL_PATH": str(model_path),
        "TOKENIZER_PATH": str(tokenizer_path),
        "VOICES_PATH": str(voices_dir),
        "DEVICE": "cpu",
    }


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    return load_settings(base_env)


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Engine:
    engine = Engine(settings)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def speech(settings: Settings, engine: Engine) -> SpeechService:
    return SpeechService(settings, engine)


@pytest.fixture(scope="session")
def worker(speech: SpeechService) -> Worker:
    """The RunPod queue front on the session's speech service."""
    return Worker(speech)


# --- S3: moto on loopback, and the settings of a worker that uploads to it ----------------


@pytest.fixture(scope="session")
def s3_store() -> Iterator[StrictStore]:
    """moto's S3 refusing the newer checksums, with bucket `audio` (any key may write)."""
    store = StrictStore()
    store.client().create_bucket(Bucket="audio")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def auth_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStore]:
    """moto with authentication on, bucket `private`, one valid key pair."""
    store = AuthStore(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def s3_env(s3_store: StrictStore) -> dict[str, str]:
    """The S3 settings of a worker writing to `s3_store`'s bucket `audio`."""
    return {
        "S3_BUCKET": "audio",
        "S3_ENDPOINT_URL": s3_store.url,
        "AWS_ACCESS_KEY_ID": S3_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_URL_EXPIRES": "600",
    }


@pytest.fixture(scope="session", autouse=True)
def no_hub_side_requests() -> Iterator[None]:
    """huggingface_hub fetches an "agent harness" list from the endpoint it read at import (the
    real hub) when it builds request headers, unless telemetry is off: tests stay on loopback."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield


@pytest.fixture
def tiny_hub(tiny_checkpoint: tuple[Path, Path]) -> Iterator[HubServer]:
    """The tiny checkpoint, served under the default repo ids by a hub-protocol server."""
    model_path, tokenizer_path = tiny_checkpoint
    settings = load_settings({})
    repos = [
        host_directory(settings.model_repo, model_path),
        host_directory(settings.tokenizer_repo, tokenizer_path),
    ]
    with HubServer(repos) as hub:
        yield hub
