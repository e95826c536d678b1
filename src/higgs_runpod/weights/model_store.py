"""Making sure the checkpoints are there (what a checkpoint is: `checkpoints`).

`ensure_checkpoints` is what a worker runs before loading; for each checkpoint, in this order:

1. MODEL_PATH holds a complete download (its completion marker matches the configured repo
   and revision, every file has its recorded size and mtime): use it. No hub request.
2. MODEL_PATH was filled by hand (no marker) and looks loadable: use it as is.
3. RunPod's cached-models directory holds the repo: use that snapshot.
4. Otherwise download, under a `VolumeLock` so that one worker fetches while the others
   wait: into a staging directory beside MODEL_PATH named for this worker alone, verify
   every size and hash, write the marker last, rename into place. A crashed download's
   staging directory is adopted (renamed to the new holder's name) and resumed; a
   published file that changed is re-verified and re-fetched.

One directory holds one revision. A complete checkpoint of another revision (or repo) at
MODEL_PATH is never replaced: workers of that revision may be loading it. The worker
refuses to start, naming the path and both revisions; give each revision its own path.
A holder that stalled past the lock's stale limit (and so lost the lock to another
worker) writes only into its own staging directory, and checks that it still holds the
lock, and that the target is still no other revision's, right before publishing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from higgs_runpod.container.volume_lock import (
    LockTimeout,
    VolumeLock,
    adopt_staging,
    publish_directory,
    remove_tree,
)
from higgs_runpod.errors import CheckpointDownloadError, ModelNotFoundError
from higgs_runpod.settings import Settings
from higgs_runpod.weights.checkpoints import (
    Checkpoints,
    CheckpointSpec,
    check_dir,
    checkpoint_specs,
    find_cached_model,
)
from higgs_runpod.weights.download import (
    Manifest,
    download_verified,
    fetch_manifest,
    file_problem,
    tree_bytes,
)

log = logging.getLogger(__name__)

MARKER = ".higgs-runpod-complete.json"


@dataclass(frozen=True)
class Ready:
    """How a checkpoint became available, for the start-up log and `higgs-runpod download`."""

    spec: CheckpointSpec
    path: Path
    source: str  # "volume", "downloaded", "repaired", "hand-filled" or "runpod-cache"
    commit: str | None
    total_bytes: int
    seconds: float

    def describe(self) -> str:
        """One line: which path, which revision, how many bytes, how long."""
        if self.source == "hand-filled":  # its revision is unknown: nothing recorded it
            what = "filled by hand (no download marker)"
        else:
            revision = self.spec.revision
            commit = f" (commit {self.commit})" if self.commit not in (None, revision) else ""
            what = f"{self.spec.repo} revision {revision}{commit}"
        return (
            f"{self.spec.variable}={self.path}: {what}, {self.total_bytes / 1e6:.1f} MB, "
            f"{self.source}, ready in {self.seconds:.1f} s"
        )


# -- the completion marker --------------------------------------------------------------------


def read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((path / MARKER).read_text())
        Manifest.from_json(marker["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker


def _marker_matches(marker: dict, spec: CheckpointSpec) -> bool:
    manifest = marker["manifest"]
    return manifest["repo"] == spec.repo and spec.revision in (
        manifest["revision"],
        manifest["commit"],
    )


def _changed_files(path: Path, marker: dict) -> list[str]:
    """Files whose size or mtime differ from the marker's record (stat only, no reading)."""
    changed = []
    for name, recorded in marker["stat"].items():
        try:
            stat = (path / name).stat()
        except OSError:
            changed.append(name)
            continue
        if stat.st_size != recorded["size"] or stat.st_mtime_ns != recorded["mtime_ns"]:
            changed.append(name)
    return changed


def _marker_for(directory: Path, manifest: Manifest) -> dict:
    stat = {}
    for file in manifest.files:
        info = (directory / file.path).stat()
        stat[file.path] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    return {
        "manifest": manifest.to_json(),
        "stat": stat,
        "total_bytes": manifest.total_bytes,
        "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- ensuring a checkpoint ----------------------------------------------------------------------


def ensure_checkpoints(settings: Settings) -> tuple[Checkpoints, tuple[Ready, Ready]]:
    """Make both checkpoints available (downloading if needed); returns where they are."""
    model, tokenizer = (ensure_checkpoint(spec, settings) for spec in checkpoint_specs(settings))
    return Checkpoints(model.path, tokenizer.path), (model, tokenizer)


def ensure_checkpoint(spec: CheckpointSpec, settings: Settings) -> Ready:
    start = time.monotonic()
    marker = read_marker(spec.path)
    if marker and _marker_matches(marker, spec) and not _changed_files(spec.path, marker):
        check_dir(spec)
        return _ready(spec, "volume", marker, start)
    if marker is None and _has_files(spec.path):
        _check_hand_filled(spec)
        return _ready(spec, "hand-filled", None, start)
    cached = find_cached_model(settings.hf_cached_models_path, spec)
    if cached is not None:
        return Ready(spec, cached, "runpod-cache", cached.name, tree_bytes(cached), 0.0)
    if marker and not _marker_matches(marker, spec):
        raise _other_revision(spec, marker)

    lock = VolumeLock(
        _sibling(spec.path, "lock"),
        stale_after_s=settings.download_lock_stale_s,
        heartbeat_s=settings.download_lock_stale_s / 12,
        wait_timeout_s=settings.download_wait_timeout_s,
        on_wait=log.info,
    )
    try:
        lock.acquire()
    except LockTimeout as error:
        raise CheckpointDownloadError(f"{spec.variable}: {error}") from None
    except OSError as error:
        raise CheckpointDownloadError(
            f"{spec.variable}={spec.path}: cannot create files beside it ({error})"
        ) from None
    try:
        source, marker = _fill_under_lock(spec, settings, lock)
    finally:
        lock.release()
    check_dir(spec)
    return _ready(spec, source, marker, start)


def _ready(spec: CheckpointSpec, source: str, marker: dict | None, start: float) -> Ready:
    if marker is None:  # filled by hand: nothing recorded, count what is there
        return Ready(spec, spec.path, source, None, tree_bytes(spec.path), 0.0)
    commit = marker["manifest"]["commit"]
    seconds = time.monotonic() - start
    return Ready(spec, spec.path, source, commit, marker["total_bytes"], seconds)


def _check_hand_filled(spec: CheckpointSpec) -> None:
    try:
        check_dir(spec)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            f"{error} ({spec.variable} has files but no download marker, so higgs-runpod "
            f"will not overwrite it: empty or delete it to have {spec.repo} downloaded there.)"
        ) from None


def _fill_under_lock(
    spec: CheckpointSpec, settings: Settings, lock: VolumeLock
) -> tuple[str, dict | None]:
    """Holding the lock: finish whatever is missing. Returns (source, marker or None)."""
    marker = read_marker(spec.path)
    if marker is None and _has_files(spec.path):
        _check_hand_filled(spec)  # filled by hand while we waited
        return "hand-filled", None
    if marker and not _marker_matches(marker, spec):
        raise _other_revision(spec, marker)  # published by another revision while we waited
    staging = adopt_staging(spec.path, "partial")
    if marker:
        changed = _changed_files(spec.path, marker)
        if not changed:
            return "volume", marker  # another worker finished while we waited
        if _rehash_ok(spec.path, marker, changed):
            marker["stat"] = _marker_for(spec.path, Manifest.from_json(marker["manifest"]))["stat"]
            publish_marker_in_place(spec.path, marker)
            return "volume", marker
        log.warning("%s=%s failed verification; re-fetching", spec.variable, spec.path)
        if not staging.exists():
            spec.path.rename(staging)  # keep the good files; the marker goes below
        return "repaired", _download(spec, settings, lock, staging)
    staged = read_marker(staging)
    if staged and _marker_matches(staged, spec) and not _changed_files(staging, staged):
        _publish(spec, settings, lock, staging, staged)  # a publish cut short by a crash
        return "downloaded", staged
    return "downloaded", _download(spec, settings, lock, staging)


def _download(spec: CheckpointSpec, settings: Settings, lock: VolumeLock, staging: Path) -> dict:
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    endpoint = settings.hf_endpoint
    manifest = fetch_manifest(spec.repo, spec.revision, token=token, endpoint=endpoint)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / MARKER).unlink(missing_ok=True)

    def report(status: str) -> None:
        lock.status = status

    label = f"{spec.variable}={spec.path}"
    try:
        download_verified(manifest, staging, label, token=token, endpoint=endpoint, report=report)
        marker = _marker_for(staging, manifest)
        _publish(spec, settings, lock, staging, marker)
    except Exception:
        if lock.holds():
            raise  # the staging directory stays for the next holder to resume
        remove_tree(staging)  # what a stalled holder wrote after losing the lock: junk
        raise _lost(spec, settings) from None
    return marker


def _publish(
    spec: CheckpointSpec, settings: Settings, lock: VolumeLock, staging: Path, marker: dict
) -> None:
    """Re-check right before the rename: still this worker's lock, and no other revision's
    complete checkpoint (or a hand-filled directory) at the target."""
    if not lock.holds():
        raise _lost(spec, settings)
    current = read_marker(spec.path)
    if current and not _marker_matches(current, spec):
        raise _other_revision(spec, current)
    if current is None and _has_files(spec.path):
        raise ModelNotFoundError(
            f"{spec.variable}={spec.path} was filled by hand during the download; higgs-runpod "
            "will not overwrite it"
        )
    try:
        publish_directory(staging, spec.path, MARKER, marker)
    except OSError as error:
        raise CheckpointDownloadError(
            f"{spec.variable}={spec.path}: could not move the download into place ({error})"
        ) from None


def _lost(spec: CheckpointSpec, settings: Settings) -> CheckpointDownloadError:
    return CheckpointDownloadError(
        f"{spec.variable}: another worker took over the download lock (this one stalled "
        f"for over {settings.download_lock_stale_s:.0f} s); restart to retry"
    )


def _other_revision(spec: CheckpointSpec, marker: dict) -> ModelNotFoundError:
    held = marker["manifest"]
    return ModelNotFoundError(
        f"{spec.variable}={spec.path} holds {held['repo']} revision {held['revision']} "
        f"(commit {held['commit']}), but this worker wants {spec.repo} revision "
        f"{spec.revision}. A complete checkpoint of another revision is never replaced "
        f"(workers of that revision may be loading it): give each revision its own "
        f"{spec.variable}, or delete {spec.path} to switch."
    )


def publish_marker_in_place(path: Path, marker: dict) -> None:
    """Rewrite the marker of a published directory (after re-verifying files that changed)."""
    scratch = path / f"{MARKER}.new"
    scratch.write_text(json.dumps(marker, indent=1))
    scratch.replace(path / MARKER)


def _rehash_ok(path: Path, marker: dict, changed: list[str]) -> bool:
    files = {file.path: file for file in Manifest.from_json(marker["manifest"]).files}
    return all(name in files and file_problem(path, files[name]) is None for name in changed)


def _sibling(path: Path, role: str) -> Path:
    """A hidden directory beside `path`, on the same filesystem (so renames are atomic)."""
    return path.with_name(f".{path.name}.{role}")


def _has_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())
