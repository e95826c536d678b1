"""Time to the first audio byte: the HTTP API (streamed) vs the queue API's /runsync.

Both servers run on loopback with the same checkpoint and get the same request (same
seed, same number of decode steps, WAV). For HTTP the clock stops at the first body byte
of the streamed response; /runsync returns one JSON object, so its first audio byte comes
with the whole response. WAV and PCM stream from the engine as frames complete, so the
HTTP API's first byte comes after the first few frames.

    .venv/bin/python bench/http_first_byte.py [--model tiny|cpu] [--requests 10] [--steps 100]

`--model cpu` is a random model of the same architecture sized for a CPU (8 layers,
hidden 512) with the tiny audio tokenizer: slower steps, same code path.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TEXT = "The quick brown fox jumps over the lazy dog."
CPU_SIZE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
}


def make_checkpoint(directory: Path, size: str) -> tuple[Path, Path]:
    import torch  # here, so that bench/abuse.py can take Server without the seconds it costs
    from transformers import HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

    from higgs_runpod.weights.tiny import sharpen_audio_head

    cli = Path(sys.executable).with_name("higgs-runpod")
    subprocess.run([cli, "make-tiny-model", directory], check=True, capture_output=True)
    model_dir, tokenizer_dir = directory / "model", directory / "tokenizer"
    if size == "cpu":
        config = HiggsAudioV2Config.from_pretrained(model_dir)
        config.update(CPU_SIZE)
        torch.manual_seed(0)
        model = HiggsAudioV2ForConditionalGeneration(config).eval()
        sharpen_audio_head(model)  # as tiny.py does: talk until max_new_tokens
        model.save_pretrained(model_dir)
    return model_dir, tokenizer_dir


class Server:
    def __init__(self, command: str, env: dict[str, str], port: int, ready_path: str) -> None:
        cli = Path(sys.executable).with_name("higgs-runpod")
        args = [cli, command, "--host", "127.0.0.1", "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + ready_path, timeout=1).status_code in (200, 307):
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{command} did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def first_byte_ms(method: str, url: str, body: dict) -> tuple[float, float]:
    """(ms to the first body byte, ms to the last) for one request."""
    start = time.perf_counter()
    first = None
    with httpx.stream(method, url, json=body, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            if first is None and chunk:
                first = time.perf_counter()
    end = time.perf_counter()
    return ((first or end) - start) * 1000.0, (end - start) * 1000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=("tiny", "cpu"), default="tiny")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    request = {"seed": 1, "max_new_tokens": args.steps, "temperature": 0.7}

    with tempfile.TemporaryDirectory() as directory:
        model_path, tokenizer_path = make_checkpoint(Path(directory), args.model)
        env = {"MODEL_PATH": str(model_path), "TOKENIZER_PATH": str(tokenizer_path),
               "DEVICE": "cpu", "VOICES_PATH": directory}  # fmt: skip
        http = Server("http", env, free_port(), "/ping")
        try:
            queue = Server("serve", env, free_port(), "/docs")
        except TimeoutError:
            http.stop()
            raise
        try:
            calls = {
                "HTTP /v1/audio/speech (streamed)": (
                    f"{http.url}/v1/audio/speech",
                    {"model": "higgs-audio-v2", "input": TEXT, "response_format": "wav", **request},
                ),
                "queue /runsync": (
                    f"{queue.url}/runsync",
                    {"input": {"text": TEXT, "format": "wav", **request}},
                ),
            }
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
            for url, body in calls.values():
                first_byte_ms("POST", url, body)  # warm-up
            for _ in range(args.requests):  # interleaved so drift hits both alike
                for name, (url, body) in calls.items():
                    results[name].append(first_byte_ms("POST", url, body))
        finally:
            http.stop()
            queue.stop()

    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"model: {args.model}, requests: {args.requests}, decode steps: {args.steps}, WAV")
    for name, samples in results.items():
        first = statistics.median(s[0] for s in samples)
        total = statistics.median(s[1] for s in samples)
        print(f"{name:34s} first byte median {first:8.1f} ms, whole response {total:8.1f} ms")


if __name__ == "__main__":
    main()
