"""Streaming: time to first audio versus total time, and streaming's cost over one-shot.

Runs the same seeded request (fixed length: the random models never end on their own)
through `SpeechService.speak` (one-shot) and `SpeechService.stream`, on the tiny checkpoint and on a
larger random model of the same architecture, on the CPU.

    .venv/bin/python bench/streaming.py [--frames 250] [--repeats 3]
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
from transformers import HiggsAudioV2ForConditionalGeneration

from higgs_runpod.request.schema import parse_request
from higgs_runpod.service.results import Piece
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings

TEXT = "Streaming lets a voice agent speak before the whole answer has been generated."
LARGER = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64}  # fmt: skip


def larger_model(tiny_model: Path, target: Path) -> Path:
    """The tiny checkpoint with a bigger generation model (same tokenizers, random weights)."""
    tiny = HiggsAudioV2ForConditionalGeneration.from_pretrained(tiny_model)
    config = tiny.config
    for name, value in LARGER.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = HiggsAudioV2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # as tiny.py: no stream EOS, so every request runs its full length
        head = model.audio_lm_head.weight.view(config.num_codebooks, config.codebook_size, -1)
        head.mul_(100.0)
        head[:, config.audio_stream_bos_id :, :] = 0.0
    model.save_pretrained(target)
    for item in tiny_model.iterdir():
        if not item.name.startswith(("model", "config")):
            (target / item.name).write_bytes(item.read_bytes())
    return target


def measure(worker: SpeechService, frames: int, repeats: int) -> dict[str, float]:
    job = {"text": TEXT, "seed": 1, "max_new_tokens": frames, "format": "pcm"}
    request = parse_request(job, worker.settings)
    stream_request = parse_request({**job, "stream": True}, worker.settings)

    async def one_shot() -> float:
        start = time.perf_counter()
        await worker.speak(request)
        return time.perf_counter() - start

    async def streamed() -> tuple[float, float]:
        start, first = time.perf_counter(), None
        async for item in worker.stream(stream_request):
            if first is None and isinstance(item, Piece):
                first = time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start

    asyncio.run(one_shot())  # warm-up
    shots = [asyncio.run(one_shot()) for _ in range(repeats)]
    streams = [asyncio.run(streamed()) for _ in range(repeats)]
    return {
        "one_shot_s": statistics.median(shots),
        "first_audio_s": statistics.median(s[0] for s in streams),
        "stream_total_s": statistics.median(s[1] for s in streams),
        "audio_s": (frames - 4) * 0.04,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as directory:
        cli = Path(sys.executable).with_name("higgs-runpod")
        subprocess.run([cli, "make-tiny-model", directory], check=True, capture_output=True)
        tiny = Path(directory, "model")
        models = {"tiny": tiny, "larger": larger_model(tiny, Path(directory, "larger"))}
        print(f"request: {args.frames} steps (~{(args.frames - 4) * 0.04:.1f} s of audio), "
              f"median of {args.repeats}; first piece = 5 frames")  # fmt: skip
        header = ("model", "params", "one-shot s", "stream s", "first audio s", "stream overhead")
        print("{:8} {:>10} {:>10} {:>9} {:>13} {:>15}".format(*header))
        for name, path in models.items():
            env = {"MODEL_PATH": str(path), "TOKENIZER_PATH": str(Path(directory, "tokenizer")),
                   "DEVICE": "cpu"}  # fmt: skip
            worker = SpeechService(load_settings(env))
            worker.engine.load()
            params = worker.engine.model.num_parameters()
            r = measure(worker, args.frames, args.repeats)
            overhead = r["stream_total_s"] / r["one_shot_s"] - 1
            row = (
                name,
                f"{params / 1e6:.2f}M",
                f"{r['one_shot_s']:.2f}",
                f"{r['stream_total_s']:.2f}",
                f"{r['first_audio_s']:.3f}",
                f"{overhead:+.1%}",
            )
            print("{:8} {:>10} {:>10} {:>9} {:>13} {:>15}".format(*row))


if __name__ == "__main__":
    main()
