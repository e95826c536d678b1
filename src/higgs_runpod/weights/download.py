"""Talking to the Hugging Face hub: what a checkpoint should hold, fetching it, checking files.

`fetch_manifest` asks the hub (or the mirror in HF_ENDPOINT) which files a revision holds,
with their sizes and hashes; `download_files` lets the real `huggingface_hub` client fetch
them into a directory (resumable, with its progress bars); `file_problems` checks files on
disk against the manifest. Hub errors become `CheckpointDownloadError` messages that say
what to do; tokens never appear in them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from higgs_runpod.errors import CheckpointDownloadError, InsufficientSpaceError, mask_url_secrets

log = logging.getLogger(__name__)

HASH_CHUNK = 8 * 1024 * 1024
HF_METADATA_DIR = ".cache"  # where huggingface_hub keeps its local_dir bookkeeping
SPACE_MARGIN_BYTES = 64 * 1024 * 1024
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class RemoteFile:
    """One file of a revision. LFS files have a sha256; the others a git blob sha1."""

    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None


@dataclass(frozen=True)
class Manifest:
    repo: str
    revision: str  # as configured: a branch, a tag or a commit hash
    commit: str  # what the hub resolved it to
    files: tuple[RemoteFile, ...]

    @property
    def total_bytes(self) -> int:
        return sum(file.size for file in self.files)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "files": [asdict(file) for file in self.files]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        files = tuple(RemoteFile(**file) for file in data["files"])
        return cls(data["repo"], data["revision"], data["commit"], files)


def _token(token: str | None) -> str | bool | None:
    return token or None  # None: huggingface_hub falls back to `hf auth login`'s stored token


def fetch_manifest(
    repo: str, revision: str, *, token: str | None, endpoint: str | None
) -> Manifest:
    """Resolve `revision` to a commit and list its files with sizes and hashes (one request)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint, token=_token(token)).model_info(
            repo, revision=revision, files_metadata=True
        )
    except Exception as error:
        raise hub_error(error, repo, revision, endpoint) from None
    files = []
    for sibling in info.siblings or []:
        if sibling.size is None:
            raise CheckpointDownloadError(f"the hub gave no size for {repo}/{sibling.rfilename}")
        lfs_sha256 = sibling.lfs.sha256 if sibling.lfs else None
        files.append(
            RemoteFile(
                path=sibling.rfilename,
                size=sibling.size,
                sha256=lfs_sha256,
                git_sha1=None if lfs_sha256 else sibling.blob_id,
            )
        )
    if not info.sha or not files:
        raise CheckpointDownloadError(f"the hub listed no files for {repo} at {revision}")
    return Manifest(repo, revision, info.sha, tuple(sorted(files, key=lambda file: file.path)))


def download_files(
    manifest: Manifest, directory: Path, *, token: str | None, endpoint: str | None
) -> None:
    """Fetch the manifest's commit into `directory` with huggingface_hub (resumes partial files).

    Files already there with huggingface_hub's bookkeeping for this commit are skipped without
    a request; callers delete the files that failed verification first.
    """
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            manifest.repo,
            revision=manifest.commit,
            local_dir=directory,
            token=_token(token),
            endpoint=endpoint,
        )
    except Exception as error:
        raise hub_error(error, manifest.repo, manifest.revision, endpoint) from None


def download_verified(
    manifest: Manifest,
    staging: Path,
    label: str,
    *,
    token: str | None,
    endpoint: str | None,
    report: Callable[[str], None],
) -> None:
    """Bring `staging` to exactly the manifest's files, every size and hash checked.

    Whatever `staging` already holds (the files a crashed download finished, a checkpoint
    being repaired) is kept where it verifies, so only the rest is fetched; a file that fails
    verification after downloading is fetched once more before giving up.
    """
    prune(staging, manifest)
    present = [file for file in manifest.files if (staging / file.path).is_file()]
    forget_files(staging, file_problems(staging, present))
    check_space(label, staging, manifest)
    log.info(
        "%s: downloading %s revision %s (commit %s, %.1f MB)",
        label, manifest.repo, manifest.revision, manifest.commit, manifest.total_bytes / 1e6,
    )  # fmt: skip
    with Progress(staging, manifest.total_bytes, report):
        download_files(manifest, staging, token=token, endpoint=endpoint)
        problems = file_problems(staging, manifest.files)
        if problems:
            log.warning("re-fetching files that did not verify: %s", "; ".join(problems.values()))
            forget_files(staging, problems)
            download_files(manifest, staging, token=token, endpoint=endpoint)
            problems = file_problems(staging, manifest.files)
    if problems:
        raise CheckpointDownloadError(
            f"{manifest.repo} at {manifest.commit} did not verify after downloading twice: "
            f"{'; '.join(problems.values())}"
        )


def prune(staging: Path, manifest: Manifest) -> None:
    """Drop files the manifest does not list or whose size is wrong (the rest gets verified),
    and what downloads that died or lost their lock left in huggingface_hub's bookkeeping:
    their temporary files (a stalled holder may still append to one) and their lock files
    (a stalled holder still holds one, and the next download would wait on it for ever).
    Unlinked, they stay with whoever has them open; the next download makes new ones."""
    bookkeeping = staging / HF_METADATA_DIR / "huggingface" / "download"
    for pattern in ("**/*.incomplete", "**/*.lock"):
        for orphan in bookkeeping.glob(pattern):
            orphan.unlink(missing_ok=True)
    wanted = {file.path: file for file in manifest.files}
    for entry in staging.rglob("*"):
        relative = entry.relative_to(staging).as_posix()
        if not entry.is_file() or relative.startswith(f"{HF_METADATA_DIR}/"):
            continue
        file = wanted.get(relative)
        if file is None or entry.stat().st_size != file.size:
            forget_files(staging, [relative])


def check_space(label: str, staging: Path, manifest: Manifest) -> None:
    have = sum(
        (staging / file.path).stat().st_size
        for file in manifest.files
        if (staging / file.path).is_file()
    )
    need = manifest.total_bytes - have + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(staging).free
    if free < need:
        raise InsufficientSpaceError(
            f"{label}: {manifest.repo} needs {need / 1e9:.2f} GB more but the "
            f"volume has {free / 1e9:.2f} GB free; enlarge the network volume or free space"
        )


class Progress:
    """While downloading, report "N of M MB" (the lock's status: waiting workers log it)."""

    def __init__(self, staging: Path, total: int, report: Callable[[str], None]) -> None:
        self._staging, self._total, self._report = staging, total, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download progress", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            done = min(tree_bytes(self._staging), self._total)
            self._report(f"downloaded {done / 1e6:.1f} of {self._total / 1e6:.1f} MB")

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def hub_error(error: Exception, repo: str, revision: str, endpoint: str | None) -> Exception:
    """A message that says what went wrong and what to do, from a huggingface_hub exception;
    credentials in HF_ENDPOINT (or in any URL the hub's message names) are masked."""
    explained = _explain_hub_error(error, repo, revision, endpoint)
    return type(explained)(mask_url_secrets(str(explained)))


def _explain_hub_error(
    error: Exception, repo: str, revision: str, endpoint: str | None
) -> Exception:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint or "https://huggingface.co"
    if isinstance(error, GatedRepoError):
        return CheckpointDownloadError(
            f"{repo} is gated: accept its terms on the model page with your account, then set "
            f"HF_TOKEN to a token of that account (the hub at {where} refused the download)"
        )
    if isinstance(error, RevisionNotFoundError):
        return CheckpointDownloadError(
            f"{repo} has no revision {revision!r} on {where}; check MODEL_REVISION / "
            "TOKENIZER_REVISION (a branch, a tag or a full commit hash)"
        )
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointDownloadError(
            f"{repo} was not found on {where} (or it is private and HF_TOKEN is missing or has "
            "no access); check MODEL_REPO / TOKENIZER_REPO and HF_TOKEN"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else "?"
        hint = " (HF_TOKEN is missing or wrong)" if status in (401, 403) else ""
        return CheckpointDownloadError(
            f"the hub at {where} answered HTTP {status} for {repo}{hint}: "
            f"{str(error).splitlines()[0]}"
        )
    if isinstance(error, CheckpointDownloadError):
        return error
    return CheckpointDownloadError(
        f"could not download {repo} from {where}: {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no detail'} (check the network, "
        "HF_ENDPOINT, and that the volume is writable)"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_sha1_of(path: Path) -> str:
    """The id git (and the hub) gives a file's contents: sha1 of "blob SIZE\\0" + bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(directory: Path, file: RemoteFile, *, check_hash: bool = True) -> str | None:
    """What is wrong with `file` under `directory`, or None when it is what the hub says."""
    path = directory / file.path
    try:
        size = path.stat().st_size
    except OSError:
        return f"{file.path} is missing"
    if size != file.size:
        return f"{file.path} has {size} bytes, expected {file.size}"
    if check_hash and file.sha256 and sha256_of(path) != file.sha256:
        return f"{file.path} has the wrong sha256"
    if check_hash and file.git_sha1 and git_sha1_of(path) != file.git_sha1:
        return f"{file.path} has the wrong content (git blob id)"
    return None


def file_problems(
    directory: Path, files: Iterable[RemoteFile], *, check_hash: bool = True
) -> dict[str, str]:
    """Problems by file path; empty when every file verifies."""
    problems = {}
    for file in files:
        problem = file_problem(directory, file, check_hash=check_hash)
        if problem:
            problems[file.path] = problem
    return problems


def forget_files(directory: Path, paths: Iterable[str]) -> None:
    """Delete files and huggingface_hub's record of them, so the next download fetches them."""
    bookkeeping = directory / HF_METADATA_DIR / "huggingface" / "download"
    for path in paths:
        (directory / path).unlink(missing_ok=True)
        (bookkeeping / f"{path}.metadata").unlink(missing_ok=True)


def tree_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())
