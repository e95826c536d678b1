"""What can be checked of the delivery files without a Docker engine or GitHub.

There is no Docker engine in CI or here, so the Dockerfile is checked by reading it
(every file it copies exists, the modules it runs exist, the targets and defaults are
the documented ones) and by hadolint in `make check-delivery`. The image's Python-side
weight is measured by installing exactly what the thin target installs into an empty
virtual environment (bench/image_size.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from higgs_runpod.schema import parse_request
from higgs_runpod.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = {"KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIALS"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def env_defaults() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    return env


def exec_module(json_args: str) -> str:
    """The module of a `["python", "-m", MODULE, ...]` exec-form command."""
    args = json.loads(json_args)
    assert args[:2] == ["python", "-m"], f"expected python -m MODULE, got {args}"
    return args[2]


def test_every_file_the_dockerfile_copies_exists() -> None:
    copies = [rest for word, rest in instructions() if word == "COPY"]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, ".dockerignore must exclude everything not copied (.venv is 5 GB)"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copies
    for rest in copies:
        parts = rest.split()
        if parts[0].startswith("--from="):
            continue  # from another stage or image, not from the repository
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
            assert source.rstrip("/") in included, f"{source} is excluded by .dockerignore"


def test_the_commands_the_image_runs_exist() -> None:
    cmd = [rest for word, rest in instructions() if word == "CMD"]
    health = [rest for word, rest in instructions() if word == "HEALTHCHECK"]
    assert len(health) == 1
    modules = [exec_module(rest) for rest in cmd]
    modules.append(exec_module(health[0].split("CMD", 1)[1]))
    assert "higgs_runpod.bootstrap" in modules and "higgs_runpod.health" in modules
    for module in modules:
        path = ROOT / "src" / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{module} is not a module of this project"


def test_targets_thin_is_the_default_and_full_bakes_the_runtime_in() -> None:
    stages = [rest.split()[-1] for word, rest in instructions() if word == "FROM"]
    assert stages[-1] == "thin", "the last stage is what a plain `docker build` produces"
    assert "full" in stages
    text = (ROOT / "Dockerfile").read_text()
    full = text.split("AS full", 1)[1].split("FROM ", 1)[0]
    assert "--require-hashes" in full and "requirements.lock" in full
    assert "RUNTIME_MODE=image" in full


def test_environment_defaults_and_no_secrets_baked_in() -> None:
    env = env_defaults()
    assert env["MODEL_PATH"].startswith("/runpod-volume/bosonai/")
    assert env["TOKENIZER_PATH"].startswith("/runpod-volume/bosonai/")
    assert env["RUNTIME_REQUIREMENTS"] == "/app/requirements.lock"
    for name in env:
        words = set(name.upper().split("_"))
        assert not words & SECRET_WORDS, f"{name} looks like a secret baked into the image"


def test_requirements_lock_matches_uv_lock() -> None:
    """requirements.lock (what the bootstrap and the full target install) is uv.lock's
    runtime set with hashes; regenerate with the command in its header if this fails."""
    exported = subprocess.run(
        [Path(sys.executable).with_name("uv"), "export", "--frozen", "--no-dev",
         "--no-emit-project", "--format", "requirements-txt", "--quiet"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("#")]

    committed = (ROOT / "requirements.lock").read_text()
    assert body(exported) == body(committed), "requirements.lock is stale: re-export it"
    assert "--hash=sha256:" in committed


def test_thin_python_content_stays_under_budget() -> None:
    done = subprocess.run(
        [sys.executable, ROOT / "bench/image_size.py", "--budget-mb", "100"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(done.stdout)  # noqa: T201  (shown with -s or on failure)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"thin: .* = \d+\.\d MB", done.stdout)


def test_workflow_actions_are_pinned_to_commits() -> None:
    workflows = sorted((ROOT / ".github/workflows").glob("*.yml"))
    assert {p.name for p in workflows} >= {"image.yml", "tests.yml"}
    for path in workflows:
        for ref in re.findall(r"uses:\s*(\S+)", path.read_text()):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref}"


def test_hub_entry_point_runs_the_bootstrap() -> None:
    """RunPod Hub requires a handler.py; ours must start what the image starts."""
    done = subprocess.run(
        [sys.executable, ROOT / ".runpod/handler.py"],
        env={"PATH": "/usr/bin:/bin", "RUNTIME_MODE": "sometimes"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "[bootstrap] ERROR: RUNTIME_MODE" in done.stderr


@pytest.mark.parametrize("name", ["hub.json", "tests.json"])
def test_runpod_hub_files_have_the_required_fields(name: str) -> None:
    data = json.loads((ROOT / ".runpod" / name).read_text())
    if name == "hub.json":
        assert {"title", "description", "type", "category", "config"} <= set(data)
        assert data["type"] == "serverless" and data["category"] == "audio"
        config = data["config"]
        assert config["runsOn"] == "GPU" and config["gpuCount"] >= 1
        endpoint = json.loads((ROOT / "deploy/endpoint.json").read_text())["endpoint"]
        assert config["gpuIds"] == ",".join(endpoint["gpu"]["pools"])
    else:
        assert data["tests"] and all({"name", "input"} <= set(t) for t in data["tests"])
        assert data["config"]["gpuCount"] >= 1
        for test in data["tests"]:  # each input is a job the worker accepts
            parse_request(test["input"], load_settings({}))
