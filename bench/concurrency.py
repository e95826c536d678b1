"""Jobs through the handler, one at a time versus all at once (micro-batched), in one run.

    .venv/bin/python bench/concurrency.py            # the CPU-sized model, 8 jobs
    .venv/bin/python bench/concurrency.py --shape tiny --jobs 4 --frames 40

Builds a random checkpoint of the chosen shape (bench/throughput.py's SHAPES, with the tiny
audio tokenizer) in a temporary directory, starts a `Worker` on it, and runs the same N
jobs (different texts, default sampling, no seed) through `Worker.handle`: first awaited one
by one, then as N concurrent asyncio tasks. Prints wall time, audio seconds per second and
the speed-up. Also prints the voice cache's effect on the prepare step for one clip.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from throughput import SHAPES

from higgs_runpod.engine import Engine
from higgs_runpod.handler import Worker
from higgs_runpod.prompts import build_conversation
from higgs_runpod.settings import load_settings
from higgs_runpod.tiny import make_tiny_model
from higgs_runpod.voices import ReferenceClip

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Generate audio following instruction.",
    "Audio is recorded in a quiet room.",
    "You are an AI assistant designed to convert text into speech.",
    "Fine, thanks.",
    "SPEAKER0: feminine. SPEAKER1: masculine.",
    "0123456789",
]


async def run_jobs(worker: Worker, inputs: list[dict], together: bool) -> float:
    start = time.perf_counter()
    jobs = [{"id": f"job-{i}", "input": x} for i, x in enumerate(inputs)]
    if together:
        outputs = await asyncio.gather(*(worker.handle(job) for job in jobs))
    else:
        outputs = [await worker.handle(job) for job in jobs]
    elapsed = time.perf_counter() - start
    errors = [o["error"] for o in outputs if "error" in o]
    if errors:
        raise SystemExit(f"jobs failed: {errors}")
    return elapsed


def prepare_times(engine: Engine, seconds: float) -> tuple[float, float]:
    """Milliseconds of the prepare step for one clip: uncached (first use), then cached."""
    noise = np.random.default_rng(0).standard_normal(int(24_000 * seconds))
    samples = (0.1 * noise).astype(np.float32)
    conversation = build_conversation("Hello.", voice=ReferenceClip(samples, "Hello there."))
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        engine._prepare(conversation)
        timings.append((time.perf_counter() - start) * 1000)
    return timings[0], timings[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--frames", type=int, default=60, help="max_new_tokens of each job")
    parser.add_argument("--window-ms", type=float, default=20.0)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_path, tokenizer_path = make_tiny_model(Path(tmp), shape=SHAPES[args.shape])
        settings = load_settings(
            {
                "MODEL_PATH": str(model_path),
                "TOKENIZER_PATH": str(tokenizer_path),
                "VOICES_PATH": str(Path(tmp) / "voices"),
                "DEVICE": "cpu",
                "MAX_BATCH_SIZE": str(args.jobs),
                "BATCH_WINDOW_MS": str(args.window_ms),
            }
        )
        worker = Worker(settings)
        worker.engine.load()
        texts = (TEXTS * (args.jobs // len(TEXTS) + 1))[: args.jobs]
        inputs = [{"text": t, "max_new_tokens": args.frames, "format": "wav"} for t in texts]
        asyncio.run(run_jobs(worker, inputs[:2], together=True))  # warm-up
        one_by_one = asyncio.run(run_jobs(worker, inputs, together=False))
        together = asyncio.run(run_jobs(worker, inputs, together=True))
        audio_s = args.jobs * args.frames / worker.engine.frame_rate  # upper bound per job
        params = sum(p.numel() for p in worker.engine.model.parameters())
        print(f"shape {args.shape} ({params / 1e6:.1f}M parameters), {args.jobs} jobs of "
              f"max_new_tokens={args.frames} through Worker.handle on the CPU")  # fmt: skip
        print(f"one at a time: {one_by_one:.2f} s ({audio_s / one_by_one:.2f} audio s/s)")
        print(f"all at once:   {together:.2f} s ({audio_s / together:.2f} audio s/s)")
        print(f"speed-up: {one_by_one / together:.2f}x")

        uncached, cached = prepare_times(worker.engine, args.clip_seconds)
        print(f"prepare step, {args.clip_seconds:g} s clip: uncached {uncached:.1f} ms, "
              f"cached {cached:.2f} ms ({uncached / cached:.0f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
