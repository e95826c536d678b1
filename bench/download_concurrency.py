"""How long N workers starting at once on an empty volume take to be ready, versus one worker,
and how many bytes the hub serves in each case.

Serves a checkpoint from tests/support/hub_server.py on loopback (the tiny model plus a large random
weights file, so that transfer time matters) and runs `higgs-runpod download` in N separate
processes, the same code path a worker runs at start-up. Ready = the process exited 0.

    PYTHONPATH=tests .venv/bin/python bench/download_concurrency.py --workers 4 --weights-mb 256 \
        --rate-mb-s 100

PYTHONPATH=tests puts the stand-in hub (tests/support/hub_server.py, test code rather
than product code) on the path.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from higgs_runpod.settings import load_settings
from higgs_runpod.weights.tiny import make_tiny_model
from support.hub_server import HubServer, host_directory


def run_workers(hub: HubServer, volume: Path, count: int) -> list[float]:
    """Start `count` download processes at once; return each one's seconds until ready."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(volume / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MODEL_PATH": str(volume / "bosonai" / "model"),
        "TOKENIZER_PATH": str(volume / "bosonai" / "tokenizer"),
        "HF_CACHED_MODELS_PATH": str(volume / "no-cache"),
    }
    command = [sys.executable, "-m", "higgs_runpod.tools.cli", "download"]
    start = time.perf_counter()
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(count)
    ]
    ready = []
    for process in processes:
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a worker failed:\n{err.decode()[-2000:]}")
        ready.append(time.perf_counter() - start)
    return ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--weights-mb", type=int, default=256, help="size of the extra weights")
    parser.add_argument("--rate-mb-s", type=float, default=100.0, help="per connection; 0: max")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="download-bench-") as scratch:
        root = Path(scratch)
        model_dir, tokenizer_dir = make_tiny_model(root / "hosted")
        (model_dir / "extra-weights.safetensors").write_bytes(os.urandom(args.weights_mb << 20))
        settings = load_settings({})
        repos = [host_directory(settings.model_repo, model_dir),
                 host_directory(settings.tokenizer_repo, tokenizer_dir)]  # fmt: skip
        checkpoint_bytes = sum(f.size for repo in repos for f in repo.files.values())
        rate = args.rate_mb_s * 1e6 or None
        print(f"checkpoint: {checkpoint_bytes / 1e6:.1f} MB in "
              f"{sum(len(repo.files) for repo in repos)} files; hub rate per connection: "
              f"{f'{args.rate_mb_s:.0f} MB/s' if rate else 'unthrottled'}")  # fmt: skip
        with HubServer(repos, bytes_per_second=rate) as hub:
            for count in (1, args.workers):
                hub.reset_counters()
                times = run_workers(hub, root / f"volume-{count}", count)
                served = hub.counters.bytes_served
                print(f"{count} worker(s) on an empty volume: all ready in {max(times):.2f} s "
                      f"(first {min(times):.2f} s); hub served {served / 1e6:.1f} MB = "
                      f"{served / checkpoint_bytes:.2f} x the checkpoint, "
                      f"{sum(hub.counters.file_gets.values())} file downloads")  # fmt: skip
            hub.reset_counters()
            times = run_workers(hub, root / f"volume-{args.workers}", args.workers)
            print(f"{args.workers} worker(s) on the filled volume: all ready in "
                  f"{max(times):.2f} s; "
                  f"hub requests: {len(hub.counters.requests)}")  # fmt: skip


if __name__ == "__main__":
    main()
