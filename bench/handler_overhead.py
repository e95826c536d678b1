"""Handler overhead: N jobs through the RunPod handler vs bare generate + decode.

Both sides use the same tiny checkpoint, the same prompt and the same number of generated
steps (greedy, RAS off, so both do identical model work); the difference is what the
worker adds per request: validation, prompt building, thread hops, resampling, encoding,
base64 and the response.

    .venv/bin/python bench/handler_overhead.py [--requests 50] [--steps 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings

TEXT = "The quick brown fox jumps over the lazy dog."


def bare_once(worker: Worker, steps: int) -> None:
    """What a script calling transformers directly would do for one request."""
    model, processor = worker.service.engine.model, worker.service.engine.processor
    inputs = processor.apply_chat_template(
        build_conversation(TEXT),
        tokenize=True,
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        sequences = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        processor.batch_decode(sequences)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        # A separate process builds the checkpoint: training its tokenizer in this process
        # leaves thread pools behind that would slow whichever side runs on this thread.
        cli = Path(sys.executable).with_name("higgs-runpod")
        subprocess.run([cli, "make-tiny-model", directory], check=True, capture_output=True)
        model_path, tokenizer_path = Path(directory, "model"), Path(directory, "tokenizer")
        settings = load_settings(
            {"MODEL_PATH": str(model_path), "TOKENIZER_PATH": str(tokenizer_path), "DEVICE": "cpu"}
        )
        worker = Worker(SpeechService(settings))
        worker.service.engine.load()
        job = {
            "id": "bench",
            "input": {
                "text": TEXT,
                "temperature": 0,
                "ras_win_len": 0,
                "max_new_tokens": args.steps,
            },
        }

        def handler_once() -> None:
            output = asyncio.run(worker.handle(job))
            assert output["usage"]["generated_tokens"] == args.steps, output

        timings: dict[str, list[float]] = {"handler": [], "bare": []}
        for run in (handler_once, lambda: bare_once(worker, args.steps)):
            run()  # warm-up
        for _ in range(args.requests):  # interleave so drift hits both sides alike
            for name, run in (
                ("handler", handler_once),
                ("bare", lambda: bare_once(worker, args.steps)),
            ):
                start = time.perf_counter()
                run()
                timings[name].append((time.perf_counter() - start) * 1000.0)

    handler_ms = statistics.median(timings["handler"])
    bare_ms = statistics.median(timings["bare"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"requests: {args.requests}, steps per request: {args.steps} (tiny checkpoint, CPU)")
    print(f"bare generate+decode  median {bare_ms:8.2f} ms/request")
    print(f"handler               median {handler_ms:8.2f} ms/request")
    overhead = handler_ms - bare_ms
    print(f"overhead              {overhead:8.2f} ms/request, ratio {handler_ms / bare_ms:.3f}")


if __name__ == "__main__":
    main()
