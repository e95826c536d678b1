"""VolumeLock with real processes: mutual exclusion, crashed and frozen owners, timeouts.

The processes share a local directory; the lock uses only mkdir/rename, the operations a
network filesystem makes atomic, so the same code path runs here as on a RunPod volume.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from higgs_runpod.container.volume_lock import (
    OWNER_FILE,
    LockTimeout,
    VolumeLock,
    publish_directory,
)

SPAWN = multiprocessing.get_context("spawn")
FAST = {"stale_after_s": 1.0, "heartbeat_s": 0.2, "poll_s": 0.05}


def _hold_and_log(lock_path: str, log_path: str, hold_s: float) -> None:
    with VolumeLock(Path(lock_path), wait_timeout_s=60, **FAST):
        with open(log_path, "a") as log:
            log.write(f"enter {os.getpid()}\n")
        time.sleep(hold_s)
        with open(log_path, "a") as log:
            log.write(f"exit {os.getpid()}\n")


def _hold_forever(lock_path: str, ready_path: str) -> None:
    lock = VolumeLock(Path(lock_path), **FAST)
    lock.__enter__()
    Path(ready_path).write_text("held")
    time.sleep(3600)


def _start_holder(tmp_path: Path) -> multiprocessing.Process:
    ready = tmp_path / "ready"
    process = SPAWN.Process(target=_hold_forever, args=(str(tmp_path / "lock"), str(ready)))
    process.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline, "holder never took the lock"
        time.sleep(0.05)
    return process


def test_processes_take_turns(tmp_path: Path) -> None:
    log = tmp_path / "log"
    processes = [
        SPAWN.Process(target=_hold_and_log, args=(str(tmp_path / "lock"), str(log), 0.2))
        for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = log.read_text().split()
    events = list(zip(lines[::2], lines[1::2], strict=True))
    assert len(events) == 8
    for enter, exit_ in zip(events[::2], events[1::2], strict=True):
        assert enter[0] == "enter" and exit_[0] == "exit" and enter[1] == exit_[1]
    assert not (tmp_path / "lock").exists()
    assert os.listdir(tmp_path) == ["log"], "no lock leftovers"


def test_several_waiters_breaking_one_stale_lock_still_take_turns(tmp_path: Path) -> None:
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    record = {"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": 0}
    (lock_dir / OWNER_FILE).write_text(json.dumps(record))
    log = tmp_path / "log"
    processes = [
        SPAWN.Process(target=_hold_and_log, args=(str(lock_dir), str(log), 0.3)) for _ in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    lines = log.read_text().split()
    assert len(lines) == 16
    for index in range(0, 16, 4):  # enter pid, exit pid: never two holders at once
        assert lines[index] == "enter" and lines[index + 2] == "exit"
        assert lines[index + 1] == lines[index + 3]
    assert os.listdir(tmp_path) == ["log"]


def test_killed_owner_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    start = time.monotonic()
    with VolumeLock(tmp_path / "lock", stale_after_s=30, heartbeat_s=1, wait_timeout_s=10):
        record = json.loads((tmp_path / "lock" / OWNER_FILE).read_text())
        assert record["pid"] == os.getpid()
    # A dead process of this machine is recognised without waiting for stale_after_s.
    assert time.monotonic() - start < 5


def test_frozen_owner_is_taken_over_after_its_heartbeat_goes_stale(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    messages: list[str] = []
    try:
        os.kill(holder.pid, signal.SIGSTOP)  # alive but silent: only the heartbeat tells
        start = time.monotonic()
        lock = VolumeLock(tmp_path / "lock", wait_timeout_s=30, on_wait=messages.append, **FAST)
        with lock:
            waited = time.monotonic() - start
            assert json.loads((tmp_path / "lock" / OWNER_FILE).read_text())["pid"] == os.getpid()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    assert FAST["stale_after_s"] <= waited < 10
    assert messages and f"pid {holder.pid}" in messages[0]


def test_owner_on_another_host_is_judged_by_heartbeat_only(tmp_path: Path) -> None:
    lock_dir = tmp_path / "lock"
    lock_dir.mkdir()
    record = {"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time()}
    (lock_dir / OWNER_FILE).write_text(json.dumps(record))
    start = time.monotonic()
    with VolumeLock(lock_dir, wait_timeout_s=30, **FAST):
        waited = time.monotonic() - start
    assert waited >= FAST["stale_after_s"]
    assert not lock_dir.exists()


def test_live_owner_makes_waiters_time_out_with_a_clear_message(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path)
    try:
        start = time.monotonic()
        with (
            pytest.raises(LockTimeout, match=rf"held by pid {holder.pid}.*delete"),
            VolumeLock(tmp_path / "lock", wait_timeout_s=1.5, **FAST),
        ):
            pass
        assert time.monotonic() - start < 5
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()


def test_holder_notices_when_its_lock_was_taken_over(tmp_path: Path) -> None:
    lock = VolumeLock(tmp_path / "lock", **FAST)
    with lock:
        (tmp_path / "lock" / OWNER_FILE).write_text(json.dumps({"token": "someone else"}))
        time.sleep(0.5)
        assert lock.lost
    assert (tmp_path / "lock").exists(), "a lock that is no longer ours is left alone"


def test_status_reaches_the_owner_record(tmp_path: Path) -> None:
    lock = VolumeLock(tmp_path / "lock", **FAST)
    with lock:
        lock.status = "downloaded 5 of 10 MB"
        time.sleep(0.5)
        record = json.loads((tmp_path / "lock" / OWNER_FILE).read_text())
    assert record["status"] == "downloaded 5 of 10 MB"


def test_publish_directory_replaces_the_target_with_the_marker_written_last(
    tmp_path: Path,
) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    staging = tmp_path / ".model.partial"
    staging.mkdir()
    (staging / "weights.bin").write_bytes(b"new")
    publish_directory(staging, target, ".complete.json", {"repo": "org/name"})
    assert sorted(os.listdir(target)) == [".complete.json", "weights.bin"]
    assert json.loads((target / ".complete.json").read_text()) == {"repo": "org/name"}
    assert sorted(os.listdir(tmp_path)) == ["model"]
