"""The container's health check: healthy only while the worker that loaded the model lives.

`mark_ready` is called by the worker once its model is loaded: it writes the worker's pid
into a small file. `python -m higgs_runpod.container.health` (the image's HEALTHCHECK) passes only
when that file exists and its process is alive. A worker still installing its runtime or
loading the model, or one that died, is reported unhealthy. Standard library only: the
check runs in the thin image's bare interpreter, outside the worker's runtime.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

DEFAULT_READY_FILE = "/tmp/higgs-runpod/ready.json"


def ready_file(env: Mapping[str, str]) -> Path:
    return Path(env.get("READY_FILE", DEFAULT_READY_FILE))


def mark_ready(path: Path) -> None:
    """Record that this process has loaded its model and is serving."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps({"pid": os.getpid(), "ready_at": time.time()}))
    os.replace(scratch, path)


def check(path: Path) -> str | None:
    """None when healthy, else the reason it is not."""
    try:
        pid = json.loads(path.read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"not ready: no readable {path} (still starting, or the worker never loaded)"
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"worker pid {pid} that wrote {path} is gone"
    except PermissionError:
        pass  # it exists, under another user
    return None


def main() -> int:
    problem = check(ready_file(os.environ))
    print(problem or "healthy")  # noqa: T201
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())
