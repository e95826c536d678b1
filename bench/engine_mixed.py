"""A realistic mix of jobs through the worker, one at a time versus as they arrive, in one run.

    .venv/bin/python bench/engine_mixed.py            # the CPU-sized model (about 10 minutes)
    .venv/bin/python bench/engine_mixed.py --quick    # the tiny model, a smoke run

Builds a random checkpoint of the chosen shape (bench/throughput.py's SHAPES) and one
`Worker` on it, then measures, on the same worker:

1. mix: N jobs through `Worker.handle` (the queue API's path): a distinct seed each, two
   temperatures, every third a clone of an inline clip, one long text in several chunks;
   first awaited one at a time, then sent as they arrive (spread over the first second).
   Prints wall time, audio seconds per second, the speed-up and p50/p95 latency.
2. short during long: a `--short-frames` job sent while a `--long-frames` job runs; prints
   the short job's latency as a share of the long job's.
3. HTTP: the first `--http` jobs of the mix as OpenAI speech requests to the HTTP API
   (create_app under uvicorn on loopback), one at a time, then all concurrently.

The random model never ends a clip on its own, so every job runs to max_new_tokens and
both ways do the same work.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile
import uvicorn
from first_audio import percentile
from throughput import SHAPES

from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.fronts.http_guard import uvicorn_config
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings, load_settings
from higgs_runpod.weights.tiny import make_tiny_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "Audio is recorded in a quiet room.",
    "You are listening to a test of the engine.",
    "Fine, thanks. And you?",
    "Numbers like 0123456789 are read one by one.",
    "A short one.",
    "Every request carries its own seed.",
]
LONG_TEXT = " ".join(
    f"This is sentence number {n} of a long text, which is cut into chunks." for n in range(4)
)


def clip_base64(seconds: float = 2.0) -> str:
    t = np.arange(int(24_000 * seconds)) / 24_000
    samples = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buffer = io.BytesIO()
    soundfile.write(buffer, samples.astype(np.float32), 24_000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def mix(jobs: int, frames: int, chunk_frames: int) -> list[dict[str, Any]]:
    """Job inputs: distinct seeds, two temperatures, a third of them clones, one long text
    (four sentences, a chunk each, of `chunk_frames` each: a sentence's length of audio)."""
    clip = {"audio_base64": clip_base64(), "transcript": "Hello there, this is my voice."}
    inputs = []
    for i in range(jobs):
        job: dict[str, Any] = {
            "text": TEXTS[i % len(TEXTS)],
            "seed": 1000 + i,
            "temperature": 0.7 if i % 2 else 1.0,
            "max_new_tokens": frames,
            "format": "wav",
        }
        if i % 3 == 0:
            job["voice"] = clip
        inputs.append(job)
    inputs[-1].update(text=LONG_TEXT, chunking={"method": "word", "max_words": 15},
                      max_new_tokens=chunk_frames)  # fmt: skip
    return inputs


async def timed(worker: Worker, job_input: dict[str, Any], delay: float) -> tuple[float, float]:
    """(latency s, audio s) of one job sent `delay` seconds from now."""
    await asyncio.sleep(delay)
    start = time.perf_counter()
    output = await worker.handle({"id": f"job-{delay}", "input": job_input})
    if "error" in output:
        raise SystemExit(f"a job failed: {output['error']}")
    return time.perf_counter() - start, float(output["duration_s"])


async def one_at_a_time(worker: Worker, inputs: list[dict]) -> tuple[float, list[tuple]]:
    start = time.perf_counter()
    results = [await timed(worker, x, 0.0) for x in inputs]
    return time.perf_counter() - start, results


async def as_they_arrive(
    worker: Worker, inputs: list[dict], spread_s: float
) -> tuple[float, list[tuple]]:
    start = time.perf_counter()
    delays = [spread_s * i / len(inputs) for i in range(len(inputs))]
    sends = (timed(worker, x, d) for x, d in zip(inputs, delays, strict=True))
    results = await asyncio.gather(*sends)
    return time.perf_counter() - start, list(results)


def report_mix(label: str, wall: float, results: list[tuple[float, float]]) -> float:
    audio = sum(a for _, a in results)
    latencies = [latency for latency, _ in results]
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"{label:<16} {wall:8.2f} s  {audio / wall:7.2f} audio s/s  "
          f"p50 {p50:6.2f} s  p95 {p95:6.2f} s")  # fmt: skip
    return wall


async def short_during_long(worker: Worker, long_frames: int, short_frames: int) -> None:
    base = {"seed": 1, "format": "wav", "text": "A long one that goes on and on."}
    long_job = asyncio.create_task(timed(worker, {**base, "max_new_tokens": long_frames}, 0.0))
    short_input = {**base, "text": "Short.", "max_new_tokens": short_frames}
    short, _ = await timed(worker, short_input, 1.0)  # sent once the long job is decoding
    long, _ = await long_job
    print(f"short during long: {short_frames}-frame job {short:.2f} s while a {long_frames}-"
          f"frame job took {long:.2f} s: {100 * short / long:.1f}% of it")  # fmt: skip


class ThreadedHTTP:
    """The HTTP API under uvicorn on loopback, in this process, over the same worker."""

    def __init__(self, settings: Settings, worker: Worker, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn_config(create_app(settings, worker.service), settings,
                                                    "127.0.0.1", port))  # fmt: skip
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/audio/speech"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def openai_body(job_input: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in job_input.items() if k not in ("text", "format")}
    return {"model": "higgs-audio-v2", "input": job_input["text"], "response_format": "wav",
            **body}  # fmt: skip


async def http_speech(client: httpx.AsyncClient, url: str, job_input: dict) -> None:
    response = await client.post(url, json=openai_body(job_input))
    if response.status_code != 200:
        raise SystemExit(f"an HTTP request failed: {response.status_code} {response.text}")


async def http_compare(url: str, inputs: list[dict]) -> None:
    async with httpx.AsyncClient(timeout=None) as client:
        start = time.perf_counter()
        for job_input in inputs:
            await http_speech(client, url, job_input)
        alone = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(http_speech(client, url, x) for x in inputs))
        together = time.perf_counter() - start
    print(f"HTTP, {len(inputs)} requests: one at a time {alone:.2f} s, concurrent "
          f"{together:.2f} s: {alone / together:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--frames", type=int, default=150, help="max_new_tokens of a mix job")
    parser.add_argument("--chunk-frames", type=int, default=60, help="the long text's, per chunk")
    parser.add_argument("--long-frames", type=int, default=1500)
    parser.add_argument("--short-frames", type=int, default=20)
    parser.add_argument("--http", type=int, default=8, help="HTTP requests (0: skip)")
    parser.add_argument(
        "--prompt-cache-tokens",
        default="4096",
        help="PROMPT_CACHE_TOKENS (0: every prompt prefilled whole)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few frames")
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.jobs, args.frames, args.long_frames, args.http = "tiny", 6, 20, 120, 3
        args.chunk_frames = 10

    with tempfile.TemporaryDirectory() as tmp:
        model_path, tokenizer_path = make_tiny_model(Path(tmp), shape=SHAPES[args.shape])
        settings = load_settings({
            "MODEL_PATH": str(model_path), "TOKENIZER_PATH": str(tokenizer_path),
            "VOICES_PATH": str(Path(tmp) / "voices"), "DEVICE": "cpu",
            "MAX_BATCH_SIZE": str(max(args.jobs, 2)),
            "MAX_CONTEXT_TOKENS": str(max(1024, args.long_frames + 256)),
            "PROMPT_CACHE_TOKENS": args.prompt_cache_tokens,
        })  # fmt: skip
        worker = Worker(SpeechService(settings))
        engine = worker.service.engine
        engine.load()
        params = sum(p.numel() for p in engine.model.parameters())  # type: ignore[union-attr]
        inputs = mix(args.jobs, args.frames, args.chunk_frames)
        clones = sum("voice" in x for x in inputs)
        print(f"shape {args.shape} ({params / 1e6:.1f}M parameters) on the CPU; {args.jobs} "
              f"jobs of max_new_tokens={args.frames}, {clones} clones, one long text "
              f"({args.chunk_frames} per chunk); engine slots {engine.slots}")  # fmt: skip
        asyncio.run(as_they_arrive(worker, inputs[:2], 0.0))  # warm-up
        alone = report_mix("one at a time", *asyncio.run(one_at_a_time(worker, inputs)))
        arriving = report_mix("as they arrive", *asyncio.run(as_they_arrive(worker, inputs, 1.0)))
        print(f"speed-up: {alone / arriving:.2f}x; prompt cache: "
              f"{engine.prompt_cache.reused_tokens} prompt tokens reused in all")  # fmt: skip
        asyncio.run(short_during_long(worker, args.long_frames, args.short_frames))
        if args.http:
            server = ThreadedHTTP(settings, worker)
            try:
                asyncio.run(http_compare(server.url, inputs[: args.http]))
            finally:
                server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
