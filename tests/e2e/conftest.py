"""The end-to-end tests: each starts our servers (RunPod's local API server, the HTTP server,
the browser playground) or runs a bench script that does. All of them carry the `e2e`
marker, which `make test-fast` skips; the servers they share are fixtures here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.servers import LocalServer, serving

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e `e2e` (a conftest's hook sees the whole session's items)."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def local_server(
    base_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """A worker serving the tiny model on loopback; http and private URLs allowed for tests."""
    env = {**base_env, "ALLOW_HTTP_AUDIO_URLS": "1", "ALLOW_PRIVATE_AUDIO_URLS": "1"}
    with serving(LocalServer(env, tmp_path_factory.mktemp("server") / "server.log")) as server:
        yield server


@pytest.fixture(scope="session")
def streaming_server(
    base_env: dict, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    with serving(
        LocalServer(
            {**base_env, "ENABLE_STREAMING": "1"}, tmp_path_factory.mktemp("stream") / "server.log"
        )
    ) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(
    base_env: dict[str, str], s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalServer]:
    """`higgs-runpod serve` on loopback with S3 output configured."""
    with serving(
        LocalServer({**base_env, **s3_env}, tmp_path_factory.mktemp("s3server") / "log")
    ) as server:
        yield server
