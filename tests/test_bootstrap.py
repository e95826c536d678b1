"""The bootstrap, run for real: `python -m higgs_runpod.container.bootstrap` in subprocesses, the real `uv`
installing hash-pinned wheels from a local folder (no index, no network), a temporary
directory standing in for the network volume, and the real `VolumeLock` between processes.

The runtime here is one tiny wheel built in the test; the command the bootstrap execs
imports it, which proves the published directory is what the worker would run on. A
wrapper around `uv` counts installs and can make them slow, so overlap is certain.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from higgs_runpod.container.bootstrap import MARKER, runtime_key

UV = Path(sys.executable).with_name("uv")
PROBE = "import os, tinyrt; print('RUNTIME', tinyrt.VALUE, os.environ['PYTHONPATH'])"


def make_wheel(directory: Path, value: str) -> Path:
    """A minimal pure-Python wheel `tinyrt-1.0` whose module holds `VALUE = value`."""
    files = {
        "tinyrt/__init__.py": f"VALUE = {value!r}\n",
        "tinyrt-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinyrt\nVersion: 1.0\n",
        "tinyrt-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append("tinyrt-1.0.dist-info/RECORD,,")
    files["tinyrt-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "tinyrt-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


class Volume:
    """A stand-in volume, a local package source and the bootstrap's environment."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volume = root / "volume"
        self.volume.mkdir()
        self.wheels = root / "wheels"
        wheel = make_wheel(self.wheels, "one")
        self.good_wheel = wheel.read_bytes()
        self.requirements = root / "requirements.lock"
        self.requirements.write_text(
            f"tinyrt==1.0 --hash=sha256:{hashlib.sha256(self.good_wheel).hexdigest()}\n"
        )
        self.installs = root / "installs.log"
        self.uv = root / "uv-wrapper"
        self.uv.write_text(
            f'#!/bin/sh\necho install >> "{self.installs}"\nsleep "${{SLOW_INSTALL:-0}}"\n'
            f'exec "{UV}" "$@"\n'
        )
        self.uv.chmod(0o755)
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(root),
            "RUNTIME_REQUIREMENTS": str(self.requirements),
            "VOLUME_PATH": str(self.volume),
            "RUNTIME_LOCAL_DIR": str(root / "local"),
            "RUNTIME_UV": str(self.uv),
            "UV_OFFLINE": "1",  # no network: only the local folder below
            "UV_FIND_LINKS": str(self.wheels),
            "UV_PYTHON_DOWNLOADS": "never",
        }

    @property
    def runtimes(self) -> Path:
        return self.volume / "higgs-runpod" / "runtimes"

    @property
    def runtime(self) -> Path:
        return self.runtimes / runtime_key(self.requirements)

    def install_count(self) -> int:
        return len(self.installs.read_text().splitlines()) if self.installs.exists() else 0

    def start(self, **overrides: str | None) -> subprocess.Popen[str]:
        env = {**self.env, **overrides}
        env = {k: v for k, v in env.items() if v is not None}
        command = [sys.executable, "-m", "higgs_runpod.container.bootstrap", "--", sys.executable]
        return subprocess.Popen(
            [*command, "-c", PROBE], env=env, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def run(self, **overrides: str | None) -> subprocess.CompletedProcess[str]:
        process = self.start(**overrides)
        stdout, stderr = process.communicate(timeout=120)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture
def vol(tmp_path: Path) -> Volume:
    return Volume(tmp_path)


def test_first_start_installs_publishes_with_marker_and_starts_the_worker(vol: Volume) -> None:
    done = vol.run()
    assert done.returncode == 0, done.stderr
    assert vol.install_count() == 1
    assert (vol.runtime / MARKER).is_file()
    assert done.stdout.split() == ["RUNTIME", "one", str(vol.runtime)]
    assert "GPU devices" in done.stderr and "mounted, writable" in done.stderr
    leftovers = [p.name for p in vol.runtimes.iterdir() if p.name != vol.runtime.name]
    assert leftovers == [], "no staging directory or lock may stay behind"


def test_second_start_reuses_without_installing_or_any_package_source(vol: Volume) -> None:
    assert vol.run().returncode == 0
    marker = (vol.runtime / MARKER).read_bytes()
    for wheel in vol.wheels.iterdir():
        wheel.unlink()  # nothing to install from: a reuse must not need it
    done = vol.run()
    assert done.returncode == 0, done.stderr
    assert vol.install_count() == 1
    assert "reusing the runtime" in done.stderr
    assert (vol.runtime / MARKER).read_bytes() == marker
    assert done.stdout.split()[:2] == ["RUNTIME", "one"]


def test_two_starts_at_once_install_once(vol: Volume) -> None:
    first = vol.start(SLOW_INSTALL="2")
    second = vol.start(SLOW_INSTALL="2")
    results = [(*p.communicate(timeout=120), p.returncode) for p in (first, second)]
    for stdout, stderr, returncode in results:
        assert returncode == 0, stderr
        assert stdout.split()[:2] == ["RUNTIME", "one"]
    assert vol.install_count() == 1
    assert sum("installing the runtime" in stderr for _, stderr, _ in results) == 1


def test_failed_install_leaves_nothing_trusted_and_is_retried(vol: Volume) -> None:
    tampered = make_wheel(vol.wheels, "tampered")  # same name, other bytes: hash mismatch
    failed = vol.run()
    assert failed.returncode == 2
    assert "installing the runtime failed" in failed.stderr
    assert "RUNTIME" not in failed.stdout, "the worker must not start on a failed install"
    assert [p.name for p in vol.runtimes.iterdir()] == [], "nothing may be left to trust"

    tampered.write_bytes(vol.good_wheel)
    retried = vol.run()
    assert retried.returncode == 0, retried.stderr
    assert vol.install_count() == 2
    assert (vol.runtime / MARKER).is_file()


def test_killed_install_is_never_trusted(vol: Volume) -> None:
    """A directory at the final path without the marker (an install killed mid-way, or
    an interrupted copy) and a stale staging directory are removed and installed afresh."""
    vol.runtime.mkdir(parents=True)
    (vol.runtime / "half-written.py").write_text("")
    staging = vol.runtimes / f".staging-{vol.runtime.name}-deadbeef"
    staging.mkdir()
    done = vol.run()
    assert done.returncode == 0, done.stderr
    assert vol.install_count() == 1
    assert not (vol.runtime / "half-written.py").exists() and not staging.exists()
    assert (vol.runtime / MARKER).is_file()


def test_no_volume_falls_back_to_a_local_runtime_with_a_warning(vol: Volume) -> None:
    done = vol.run(VOLUME_PATH=str(vol.root / "not-mounted"))
    assert done.returncode == 0, done.stderr
    assert "WARNING: no writable volume" in done.stderr
    local = vol.root / "local" / runtime_key(vol.requirements)
    assert (local / MARKER).is_file()
    assert done.stdout.split() == ["RUNTIME", "one", str(local)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"RUNTIME_REQUIREMENTS": None}, "RUNTIME_REQUIREMENTS is not set"),
        (
            {"RUNTIME_REQUIREMENTS": "/nonexistent/requirements.lock"},
            "RUNTIME_REQUIREMENTS: /nonexistent/requirements.lock is not a file",
        ),
        ({"RUNTIME_MODE": "sometimes"}, "RUNTIME_MODE must be one of volume, image"),
        ({"RUNTIME_LOCK_WAIT_S": "soon"}, "RUNTIME_LOCK_WAIT_S must be a number"),
        ({"RUNTIME_LOCK_STALE_S": "0"}, "RUNTIME_LOCK_STALE_S must be a number of seconds"),
        ({"RUNTIME_UV": "/nonexistent/uv"}, "RUNTIME_UV: '/nonexistent/uv' is not an"),
    ],
)
def test_a_missing_or_wrong_setting_stops_with_a_clear_message(
    vol: Volume, overrides: dict[str, str | None], message: str
) -> None:
    done = vol.run(**overrides)
    assert done.returncode == 2
    assert f"ERROR: {message}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "RUNTIME" not in done.stdout


def test_image_mode_starts_the_worker_without_installing(vol: Volume) -> None:
    done = vol.run(RUNTIME_MODE="image", RUNTIME_REQUIREMENTS=None)
    assert done.returncode == 1  # the probe cannot import tinyrt: nothing was installed
    assert "No module named 'tinyrt'" in done.stderr
    assert vol.install_count() == 0


def test_the_marker_carries_a_manifest_of_every_installed_file(vol: Volume) -> None:
    assert vol.run().returncode == 0
    files = json.loads((vol.runtime / MARKER).read_bytes())["files"]
    module = (vol.runtime / "tinyrt" / "__init__.py").read_bytes()
    assert files["tinyrt/__init__.py"] == [len(module), hashlib.sha256(module).hexdigest()]
    on_disk = {p.relative_to(vol.runtime).as_posix() for p in vol.runtime.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {MARKER}


def _drop_sitecustomize(runtime: Path, witness: Path) -> None:
    (runtime / "sitecustomize.py").write_text(f"open({str(witness)!r}, 'w').write('ran')\n")


def _change_a_module(runtime: Path, witness: Path) -> None:
    module = runtime / "tinyrt" / "__init__.py"
    module.write_text(f"open({str(witness)!r}, 'w').write('ran')\nVALUE = 'two'\n")  # size differs
    for pyc in runtime.rglob("*.pyc"):
        pyc.unlink()  # so the changed source is what Python would run


def _same_size_other_bytes(runtime: Path, witness: Path) -> None:
    module = runtime / "tinyrt" / "__init__.py"
    module.write_bytes(module.read_bytes().replace(b"one", b"owt"))  # same size, new bytes


def _add_a_pth_and_a_module(runtime: Path, witness: Path) -> None:
    (runtime / "evil.pth").write_text("import os\n")
    (runtime / "tinyrt" / "extra.py").write_text(f"open({str(witness)!r}, 'w')\n")


def _link_the_package_elsewhere(runtime: Path, witness: Path) -> None:
    copy = runtime.parent / "elsewhere"
    (runtime / "tinyrt").rename(copy)
    (runtime / "tinyrt").symlink_to(copy)


def _forget_the_manifest(runtime: Path, witness: Path) -> None:
    marker = json.loads((runtime / MARKER).read_bytes())
    del marker["files"]  # what an earlier version of the bootstrap wrote
    (runtime / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_drop_sitecustomize, "sitecustomize.py is not in the manifest"),
        (_change_a_module, "bytes, expected 14"),
        (_same_size_other_bytes, "tinyrt/__init__.py has the wrong sha256"),
        (_add_a_pth_and_a_module, "is not in the manifest"),
        (_link_the_package_elsewhere, "tinyrt is a symbolic link"),
        (_forget_the_manifest, "holds no file manifest"),
    ],
)
def test_a_runtime_that_differs_from_its_manifest_is_never_used_and_reinstalled(
    vol: Volume, tamper: Callable[[Path, Path], None], reason: str
) -> None:
    assert vol.run().returncode == 0
    witness = vol.root / "witness"
    tamper(vol.runtime, witness)
    done = vol.run()
    assert done.returncode == 0, done.stderr
    assert not witness.exists(), "code added to the volume ran"
    refused = [line for line in done.stderr.splitlines() if "NOT using the runtime" in line]
    assert len(refused) == 1 and reason in refused[0], done.stderr
    assert vol.install_count() == 2
    assert done.stdout.split() == ["RUNTIME", "one", str(vol.runtime)]
    assert not (vol.runtime / "sitecustomize.py").exists()
    again = vol.run()  # the reinstalled runtime verifies and is reused as is
    assert "reusing the runtime" in again.stderr and vol.install_count() == 2


def test_unlisted_data_files_do_not_cost_a_reinstall(vol: Volume) -> None:
    assert vol.run().returncode == 0
    (vol.runtime / "tinyrt" / "notes.txt").write_text("harmless: nothing imports it")
    done = vol.run()
    assert "reusing the runtime" in done.stderr and vol.install_count() == 1


def test_an_installer_that_lost_its_lock_does_not_publish(vol: Volume) -> None:
    """A stalls inside its install for longer than the lock's stale limit; B takes the lock
    over, installs and publishes. When A resumes it must give up, not replace B's runtime."""
    stale = {"RUNTIME_LOCK_STALE_S": "2"}
    first = vol.start(SLOW_INSTALL="3", **stale)
    deadline = time.monotonic() + 30
    while vol.install_count() < 1:  # A is in its install (the uv wrapper's sleep)
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        second = vol.run(**stale)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert second.returncode == 0, second.stderr
    published = (vol.runtime / MARKER).read_bytes()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 2, stderr
    assert "took over the install lock" in stderr and "not publishing" in stderr
    assert "RUNTIME" not in stdout
    assert (vol.runtime / MARKER).read_bytes() == published, "B's runtime was replaced"
    assert sorted(p.name for p in vol.runtimes.iterdir()) == [vol.runtime.name]
