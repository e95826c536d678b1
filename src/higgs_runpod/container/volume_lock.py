"""A lock and an atomic publish step that work on a network filesystem (standard library only).

`flock`/`fcntl` locks and the Hugging Face hub's own file locks are known to fail or hang
on network mounts such as RunPod's `/runpod-volume`, so `VolumeLock` relies only on
operations that such filesystems do make atomic: creating a directory and renaming one.

- Acquire: a directory holding an owner record (host, pid, started, heartbeat) is prepared
  under a private name beside `path`, then renamed to `path`. The rename fails while `path`
  exists, so exactly one process wins, and the lock never appears without its record.
- Hold: a daemon thread rewrites the record every `heartbeat_s` (write, then rename over).
- Wait: the others poll. A lock is stale when its record has not changed for
  `stale_after_s` as timed by the waiter's own monotonic clock (so clock skew between hosts
  does not matter), or at once when its owner is a dead process of this very host.
- Take over: a waiter that finds the lock stale claims the right to break it by creating
  `path/breaking` (one winner), checks the record is still the stale one, renames the old
  lock aside and removes it, then competes for the lock like everyone else.
- Release: the holder renames its lock aside (so nobody ever sees it half-deleted) and
  deletes it, but only while the record is still its own.

This module must stay importable before the worker's dependencies are installed: it uses
nothing outside the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

OWNER_FILE = "owner.json"
BREAKING_DIR = "breaking"
WAIT_REPORT_EVERY_S = 10.0


class LockTimeout(TimeoutError):
    """The lock stayed held by a live owner for longer than the wait allowed."""


def _pid_namespace() -> str:
    """Identifies this machine's process table, so a dead pid is only judged where it lived."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(lock_dir: Path) -> bytes | None:
    try:
        return (lock_dir / OWNER_FILE).read_bytes()
    except OSError:
        return None


def _parse_owner(raw: bytes | None) -> dict[str, Any]:
    try:
        record = json.loads(raw or b"")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write `record` to a private file beside `path`, flush it to disk, rename it over `path`."""
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    with scratch.open("w") as handle:
        json.dump(record, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(scratch, path)


def remove_tree(path: Path) -> None:
    """Delete a directory that may still be visible to others: rename it aside, then delete."""
    aside = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def owner_sibling(path: Path, role: str) -> Path:
    """A name beside `path` that only this process ever uses: `.NAME.ROLE-HOST-PID-RANDOM`.

    Staging under such a name means that a holder which stalled and lost its lock keeps
    writing, if at all, into its own directory and never into its successor's.
    """
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    return path.with_name(f".{path.name}.{role}-{host[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def adopt_staging(path: Path, role: str) -> Path:
    """Holding the lock that guards `path`: a staging directory of this process's own.

    The newest staging directory that an earlier holder left beside `path` (it died, or
    stalled and lost the lock) is renamed to the new name, so its finished files are kept
    while the earlier holder, should it resume, can no longer reach it by name; any others
    are removed. The returned directory exists only when one was adopted.
    """
    mine = owner_sibling(path, role)
    leftovers = sorted(path.parent.glob(f".{path.name}.{role}*"), key=_mtime, reverse=True)
    for leftover in leftovers:
        if not mine.exists():
            try:
                leftover.rename(mine)
                continue
            except OSError:
                pass
        remove_tree(leftover)
    return mine


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def publish_directory(staging: Path, target: Path, marker_name: str, marker: dict) -> None:
    """Make the finished directory `staging` appear as `target`, with `marker_name` written last.

    The marker (a JSON file) is written into `staging` only after everything else is in
    place, then `staging` is renamed to `target` in one step. Readers that require the
    marker therefore never see a half-written directory. Whatever `target` held before is
    renamed aside first and deleted afterwards. Call this while holding the `VolumeLock`
    that guards `target`; `staging` must be on the same filesystem as `target`.
    """
    _write_json(staging / marker_name, marker)
    _fsync_dir(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = target.with_name(f".{target.name}.previous-{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        target.rename(previous)
    staging.rename(target)
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class VolumeLock:
    """Cross-host lock on a network filesystem: an atomically created directory at `path`, an
    owner record (host, pid, started, heartbeat) inside it, a heartbeat thread refreshing it,
    takeover when the owner's heartbeat is older than `stale_after_s`.

    `status` is a short text the holder may set (for example download progress); it rides
    along in the heartbeat and waiters pass it to `on_wait`. `lost` turns true if another
    process took the lock over while this one held it (its heartbeat stalled for too long).
    """

    def __init__(
        self,
        path: Path,
        *,
        stale_after_s: float = 60.0,
        heartbeat_s: float = 5.0,
        wait_timeout_s: float = 1800.0,
        poll_s: float = 1.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        if heartbeat_s >= stale_after_s:
            raise ValueError("heartbeat_s must be shorter than stale_after_s")
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.status = ""
        self.lost = False
        self._token = ""
        self._started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> VolumeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- holding ------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        return {
            "token": self._token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "started": self._started,
            "heartbeat": time.time(),
            "status": self.status,
        }

    def _try_create(self) -> bool:
        self._token = uuid.uuid4().hex
        self._started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prepared = self.path.with_name(f".{self.path.name}.new-{self._token}")
        prepared.mkdir()
        try:
            _write_json(prepared / OWNER_FILE, self._record())
            prepared.rename(self.path)
        except OSError:  # the lock exists (EEXIST / ENOTEMPTY): someone else holds it
            shutil.rmtree(prepared, ignore_errors=True)
            return False
        return True

    def holds(self) -> bool:
        """Read the owner record now: is the lock still this holder's? Call it right before
        publishing (the heartbeat notices a takeover only at its next beat)."""
        if _parse_owner(_read_owner(self.path)).get("token") != self._token:
            self.lost = True
        return not self.lost

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                raw = (self.path / OWNER_FILE).read_bytes()
            except FileNotFoundError:
                raw = None
            except OSError:  # a network filesystem hiccup is not a loss: try the next beat
                continue
            if _parse_owner(raw).get("token") != self._token:
                self.lost = True
                return
            with contextlib.suppress(OSError):  # a missed beat is retried; staleness is slow
                _write_json(self.path / OWNER_FILE, self._record())

    def acquire(self) -> None:
        """Take the lock, waiting (at most `wait_timeout_s`) while a live owner holds it."""
        deadline = time.monotonic() + self.wait_timeout_s
        observed: bytes | None = None
        observed_at = time.monotonic()
        reported_at = 0.0
        while not self._try_create():
            now = time.monotonic()
            raw = _read_owner(self.path)
            state = (raw or b"") + (b"|breaking" if (self.path / BREAKING_DIR).is_dir() else b"")
            if state != observed:
                observed, observed_at = state, now
            record = _parse_owner(raw)
            stale_for = now - observed_at
            if self._owner_is_dead(record) or stale_for >= self.stale_after_s:
                self._break(raw, stale_for)
                continue
            if now >= deadline:
                raise LockTimeout(
                    f"gave up after {self.wait_timeout_s:.0f} s waiting for {self.path}, held "
                    f"by {_describe(record)}. If no process is really working on it, delete "
                    "that directory."
                )
            if self.on_wait and now - reported_at >= WAIT_REPORT_EVERY_S:
                reported_at = now
                self.on_wait(f"waiting for {self.path}, held by {_describe(record)}")
            time.sleep(self.poll_s)
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"heartbeat {self.path.name}", daemon=True
        )
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, unless someone else has taken it over."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holds():
            remove_tree(self.path)

    # -- taking over ----------------------------------------------------------------------

    @staticmethod
    def _owner_is_dead(record: dict[str, Any]) -> bool:
        same_machine = (
            record.get("host") == socket.gethostname()
            and record.get("pid_namespace") == _pid_namespace() != ""
        )
        pid = record.get("pid")
        return same_machine and isinstance(pid, int) and not _pid_alive(pid)

    def _break(self, stale_raw: bytes | None, stale_for: float) -> None:
        """Remove a stale lock; only one of several waiters that judge it stale does it."""
        claim = self.path / BREAKING_DIR
        try:
            claim.mkdir()
        except FileExistsError:
            # Another waiter is breaking it; if that waiter died midway, its claim goes stale.
            if stale_for >= self.stale_after_s:
                with contextlib.suppress(OSError):
                    claim.rmdir()
            time.sleep(self.poll_s)
            return
        except FileNotFoundError:  # the lock went away meanwhile
            return
        if _read_owner(self.path) != stale_raw:  # the owner beat after all, or it changed hands
            with contextlib.suppress(OSError):
                claim.rmdir()
            return
        remove_tree(self.path)


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "an unknown owner (no readable owner record)"
    now = time.time()
    parts = [f"pid {record.get('pid')} on {record.get('host')}"]
    if isinstance(record.get("started"), int | float):
        parts.append(f"for {now - record['started']:.0f} s")
    if isinstance(record.get("heartbeat"), int | float):
        parts.append(f"last heartbeat {now - record['heartbeat']:.0f} s ago")
    if record.get("status"):
        parts.append(str(record["status"]))
    return ", ".join(parts)
