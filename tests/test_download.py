"""File verification against the hub's metadata, and the manifest the real client reads from
the hub-protocol server (tests/support/hub_server.py) on loopback."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from higgs_runpod.errors import CheckpointDownloadError, mask_url_secrets
from higgs_runpod.weights.download import (
    Manifest,
    RemoteFile,
    fetch_manifest,
    file_problems,
    git_sha1_of,
)
from support.hub_server import HubServer
from support.servers import free_port


def test_git_blob_id_is_what_git_computes(tmp_path: Path) -> None:
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert git_sha1_of(tmp_path / "hello") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_file_problems_name_each_bad_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"abd")
    (tmp_path / "c.bin").write_bytes(b"ab")
    good = hashlib.sha256(b"abc").hexdigest()
    files = [RemoteFile("a.bin", 3, sha256=good), RemoteFile("b.bin", 3, sha256=good),
             RemoteFile("c.bin", 3), RemoteFile("d.bin", 1)]  # fmt: skip
    assert file_problems(tmp_path, files) == {
        "b.bin": "b.bin has the wrong sha256",
        "c.bin": "c.bin has 2 bytes, expected 3",
        "d.bin": "d.bin is missing",
    }
    assert "b.bin" not in file_problems(tmp_path, files, check_hash=False)


def test_manifest_lists_sizes_and_hashes_from_the_hub(tiny_hub: HubServer) -> None:
    repo = tiny_hub.repos["bosonai/higgs-audio-v2-tokenizer"]
    manifest = fetch_manifest(repo.repo_id, "main", token=None, endpoint=tiny_hub.url)
    assert manifest.commit == repo.commit
    by_path = {file.path: file for file in manifest.files}
    assert by_path["model.safetensors"].sha256 == repo.files["model.safetensors"].sha256
    assert by_path["config.json"].git_sha1 == repo.files["config.json"].git_sha1
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_an_unknown_repo_is_a_clear_error(tiny_hub: HubServer) -> None:
    with pytest.raises(CheckpointDownloadError, match="org/missing was not found on http"):
        fetch_manifest("org/missing", "main", token=None, endpoint=tiny_hub.url)


@pytest.mark.parametrize("closed", [False, True])
def test_hub_errors_mask_credentials_in_hf_endpoint(tiny_hub: HubServer, closed: bool) -> None:
    """HF_ENDPOINT may carry a mirror's user:password or a token; errors (and so the start-up
    log and `higgs-runpod download`) name the hub without them."""
    port = free_port() if closed else tiny_hub.url.rsplit(":", 1)[1]
    endpoint = f"http://hfuser:s3cretpw@127.0.0.1:{port}"
    if closed:
        endpoint += "/mirror?token=qtok123"
    with pytest.raises(CheckpointDownloadError) as error:
        fetch_manifest("org/missing", "main", token=None, endpoint=endpoint)
    message = str(error.value)
    assert "s3cretpw" not in message and "hfuser" not in message and "qtok123" not in message
    assert f"http://***@127.0.0.1:{port}" in message


def test_mask_url_secrets() -> None:
    text = "from https://u:p@h.example/x?token=abc&sig=d%2F: refused; see http://h2/?k=v"
    assert mask_url_secrets(text) == (
        "from https://***@h.example/x?token=***&sig=***: refused; see http://h2/?k=***"
    )
