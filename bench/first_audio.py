"""Time to first audio: wav, mp3 and opus over HTTP (chunked) and the WebSocket, one stream
at a time and with N streams at once (p50 / p95).

`higgs-runpod http` runs on loopback with a random checkpoint (see http_first_byte.py:
`--model cpu` is sized for a CPU, `tiny` is the test model); every request is a seeded
sentence of its own and runs `--steps` decode steps. The clock:

- HTTP: from sending `POST /v1/audio/speech` to the first body byte;
- WebSocket: from sending the `{"text", "close"}` message on an open, configured socket
  (a voice agent keeps one open) to the first binary message.

    .venv/bin/python bench/first_audio.py [--model cpu|tiny] [--streams 8] [--repeats 5]
                                          [--quick] [--dry-run] [--checkpoint MODEL TOKENIZER]

`--quick` is one request per cell and 2 concurrent streams (a smoke run); `--dry-run`
prints the cells and starts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from http_first_byte import Server, free_port, make_checkpoint
from websockets.asyncio.client import connect

# Every request gets a text of its own ("Request 12: ..."), so requests share only the
# system prompt: the engine's prompt cache would skip most of a repeated prompt's prefill.
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing on this fine day?",
    "Audio is recorded in a quiet room with one microphone.",
    "You are listening to a test of the streaming engine.",
    "Fine, thanks. And you, after such a very long week?",
    "Numbers like one, two and three are read one by one.",
    "Every request here carries its own text and its seed.",
    "A voice agent sends text as soon as the model writes it.",
]
TEXTS = (f"Request {n}: {SENTENCES[n % len(SENTENCES)]}" for n in itertools.count())
FORMATS = ("wav", "mp3", "opus")
TRANSPORTS = ("http", "websocket")


def cells() -> list[tuple[str, str]]:
    return [(transport, fmt) for transport in TRANSPORTS for fmt in FORMATS]


async def http_first_audio_ms(
    client: httpx.AsyncClient, url: str, audio_format: str, steps: int, ready: asyncio.Barrier
) -> float:
    body = {"model": "tts-1", "input": next(TEXTS), "response_format": audio_format,
            "seed": 1, "max_new_tokens": steps}  # fmt: skip
    await ready.wait()
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        first = None
        async for chunk in response.aiter_raw():  # all of it, as a player would
            if chunk and first is None:
                first = time.perf_counter()
    assert first is not None, "no audio came"
    return (first - start) * 1000.0


async def ws_first_audio_ms(
    client: httpx.AsyncClient, url: str, audio_format: str, steps: int, ready: asyncio.Barrier
) -> float:
    config = {"model": "tts-1", "response_format": audio_format, "seed": 1,
              "max_new_tokens": steps}  # fmt: skip
    ws_url = url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    async with connect(ws_url, open_timeout=60, max_size=None) as socket:
        await socket.send(json.dumps(config))
        await ready.wait()  # every socket open and configured, as a voice agent keeps them
        start = time.perf_counter()
        await socket.send(json.dumps({"text": next(TEXTS), "close": True}))
        first = None
        async for message in socket:
            if isinstance(message, bytes) and first is None:
                first = time.perf_counter()
            elif isinstance(message, str) and json.loads(message)["type"] == "error":
                raise RuntimeError(json.loads(message)["message"])
    assert first is not None, "no audio came"
    return (first - start) * 1000.0


Probe = Callable[[httpx.AsyncClient, str, str, int, asyncio.Barrier], Awaitable[float]]


def percentile(samples: list[float], share: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def measure(
    url: str, steps: int, repeats: int, streams: int
) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(single-stream median, p50 and p95 under `streams` at once) per (transport, format)."""
    probes: dict[str, Probe] = {"http": http_first_audio_ms, "websocket": ws_first_audio_ms}
    alone: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells()}
    loaded: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells()}
    # One client for every HTTP request, as a caller keeps one; a loaded round starts its
    # requests together once each is ready, so no setup runs inside another's clock.
    async with httpx.AsyncClient(timeout=600) as client:

        async def run(transport: str, fmt: str, count: int) -> list[float]:
            ready = asyncio.Barrier(count)
            probe = probes[transport]
            return list(await asyncio.gather(
                *(probe(client, url, fmt, steps, ready) for _ in range(count))
            ))  # fmt: skip

        for transport, fmt in cells():  # warm-up: encoders, sockets, the engine's first steps
            await run(transport, fmt, 1)
        for round_ in range(repeats):  # cells interleaved, so that drift hits them alike
            for transport, fmt in cells():
                alone[transport, fmt] += await run(transport, fmt, 1)
                if round_ % 2 == 0:
                    loaded[transport, fmt] += await run(transport, fmt, streams)
            print(f"round {round_ + 1} of {repeats} done", file=sys.stderr, flush=True)
    results = {
        cell: (statistics.median(alone[cell]), percentile(loaded[cell], 0.5),
               percentile(loaded[cell], 0.95))
        for cell in cells()
    }  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("tiny", "cpu"), default="cpu")
    parser.add_argument("--checkpoint", nargs=2, metavar=("MODEL", "TOKENIZER"))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="1 request per cell, 2 streams")
    parser.add_argument("--dry-run", action="store_true", help="list the cells, start nothing")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.streams, args.steps = 1, 2, 30
    print("cells: " + ", ".join(f"{t}/{f}" for t, f in cells()))
    if args.dry_run:
        return

    with tempfile.TemporaryDirectory() as directory:
        if args.checkpoint:
            model_path, tokenizer_path = map(Path, args.checkpoint)
        else:
            model_path, tokenizer_path = make_checkpoint(Path(directory), args.model)
        env = {"MODEL_PATH": str(model_path), "TOKENIZER_PATH": str(tokenizer_path),
               "DEVICE": "cpu", "VOICES_PATH": directory,
               "HTTP_MAX_IN_FLIGHT": str(max(8, args.streams))}  # fmt: skip
        server = Server("http", env, free_port(), "/ping")
        try:
            results = asyncio.run(measure(server.url, args.steps, args.repeats, args.streams))
        finally:
            server.stop()

    import torch

    model = "checkpoint given" if args.checkpoint else args.model
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}")  # fmt: skip
    print(f"model: {model}, decode steps: {args.steps}, single: median of {args.repeats}, "
          f"loaded: {args.streams} streams at once")  # fmt: skip
    print(f"{'transport':10s} {'format':6s} {'single ms':>10s} {'p50 ms':>9s} {'p95 ms':>9s} "
          f"{'p95/single':>10s}")  # fmt: skip
    for (transport, fmt), (single, p50, p95) in results.items():
        print(f"{transport:10s} {fmt:6s} {single:10.1f} {p50:9.1f} {p95:9.1f} "
              f"{p95 / single:10.2f}")  # fmt: skip
    for transport in TRANSPORTS:
        gap = results[transport, "mp3"][0] - results[transport, "wav"][0]
        print(f"{transport}: mp3 - wav single-stream first audio {gap:+.1f} ms (goal: <= 20)")


if __name__ == "__main__":
    main()
