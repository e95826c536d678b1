"""The engine's decode throughput per batch size, against the memory-bandwidth floor.

    .venv/bin/python bench/throughput.py --shape real    # the released 3B+2.2B shape, on a GPU
    .venv/bin/python bench/throughput.py --shape cpu     # 88.5M parameters, on this machine
    .venv/bin/python bench/throughput.py --dry-run       # the tiny shape, seconds (a test runs it)

A randomly initialised model of the chosen shape is built in memory (nothing is
downloaded) and served by the engine (`Engine.use_model`): continuous batching, KV-cache
slots, the audio-only decode step, device sampling with the default settings. Its audio
head never picks the stream EOS, so every request decodes exactly --frames frames. For
each batch size, that many requests are submitted at once; printed per size: the decode
step's median time, frames per second and seconds of audio per second (all rows), the
median time to the first frame, and memory. On CUDA the same run is made twice, with the
step captured as CUDA graphs and eagerly, side by side.

The floor: one decode step at batch 1 must read every weight it uses once (attention, the
audio MLP, the audio head and embeddings; the text MLP and text embeddings are skipped for
audio tokens), so step time >= those bytes / memory bandwidth. The bandwidth is measured in
the same run by copying a large tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import resource
import statistics
import threading
import time

import torch
from transformers import BatchFeature, HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.weights.tiny import (
    TINY_SHAPE,
    build_model,
    build_text_tokenizer,
    sharpen_audio_head,
)

FRAME_RATE = 25.0  # frames per second of audio, as in the real tokenizer

# Shapes: `tiny` and `cpu` use the tiny audio vocabulary (so a checkpoint of that shape
# works with the tiny audio tokenizer, see bench/concurrency.py); `real` is the released
# model's shape (3B text backbone + 2.2B audio MLPs).
SHAPES: dict[str, dict] = {
    "tiny": TINY_SHAPE,
    "cpu": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                num_attention_heads=12, num_key_value_heads=4, head_dim=64),
    "real": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                 num_attention_heads=24, num_key_value_heads=8, head_dim=128),
}  # fmt: skip


def build_real(device: torch.device, dtype: torch.dtype) -> HiggsAudioV2ForConditionalGeneration:
    """The released shape, initialised where it runs (5B parameters on a CPU would be slow)."""
    config = HiggsAudioV2Config(**SHAPES["real"], codebook_size=1026, max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = HiggsAudioV2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    sharpen_audio_head(model)
    return model


def build(shape: str, device: torch.device, dtype: torch.dtype):
    if shape == "real":
        return build_real(device, dtype)
    return build_model(build_text_tokenizer(), shape=SHAPES[shape]).to(device, dtype)


def decode_bytes(model: HiggsAudioV2ForConditionalGeneration) -> int:
    """Bytes of weights one audio decode step reads: all but text embeddings and text MLPs."""
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not (name.startswith("model.embed_tokens") or ".mlp." in name)
    )


def measure_bandwidth(device: torch.device, megabytes: int) -> float:
    """Bytes per second of a large device-to-device copy (each byte read once, written once)."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_for(model, device: torch.device, dtype: torch.dtype, slots: int, context: int,
               graphs: bool) -> Engine:  # fmt: skip
    settings = load_settings({
        "DEVICE": device.type, "DTYPE": str(dtype).removeprefix("torch."),
        "MAX_BATCH_SIZE": str(slots), "MAX_CONTEXT_TOKENS": str(context),
        "KV_CACHE_TOKENS": str(slots * context), "CUDA_GRAPHS": "true" if graphs else "false",
    })  # fmt: skip
    engine = Engine(settings)
    engine.use_model(model)
    return engine


def run_batch(engine: Engine, batch: int, frames: int, prompt_tokens: int) -> dict:
    """`batch` requests at once, each decoding `frames` frames after the same prompt."""
    config = engine.model.config  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(20, 400, (1, prompt_tokens - 1), generator=generator)
    prompt = torch.cat([text, torch.tensor([[config.audio_bos_token_id]])], dim=1)

    def prepare() -> BatchFeature:
        return BatchFeature({"input_ids": prompt.to(engine.device)})

    steps = frames + config.num_codebooks  # the opening BOS step and the delay pattern
    frame_times: list[list[float]] = [[] for _ in range(batch)]

    def run(row: int) -> None:
        params = SamplingParams(seed=row, max_new_tokens=steps)  # the default sampling
        engine.decode(prepare, params, on_frames=lambda f: frame_times[row].append(
            time.perf_counter()))  # fmt: skip

    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    threads = [threading.Thread(target=run, args=(row,)) for row in range(batch)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = time.perf_counter() - start
    # Steady state: the gaps between frames once every row has joined the batch.
    joined = max(times[0] for times in frame_times)
    gaps = [b - a for times in frame_times for a, b in itertools.pairwise(times)
            if a >= joined]  # fmt: skip
    step_ms = statistics.median(gaps) * 1000 if gaps else float("nan")
    memory = (
        torch.cuda.max_memory_allocated(engine.device)
        if engine.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "batch": batch,
        "step_ms": step_ms,
        "frames_per_s": batch * 1000 / step_ms,
        "audio_s_per_s": batch * frames / FRAME_RATE / total,
        "first_audio_ms": statistics.median(times[0] - start for times in frame_times) * 1000,
        "memory_mb": memory / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-sizes", default=None, help="default: 1..64 on CUDA, 1..16 on CPU")
    parser.add_argument("--frames", type=int, default=100, help="frames each row decodes")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--copy-mb", type=int, default=None, help="bandwidth probe size")
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, CPU, two sizes")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shape, args.device, args.batch_sizes, args.frames = "tiny", "cpu", "1,2", 8
        args.copy_mb = args.copy_mb or 64
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # fmt: skip
    default_sizes = "1,2,4,8,16,32,64" if device.type == "cuda" else "1,2,4,8,16"
    sizes = [int(b) for b in (args.batch_sizes or default_sizes).split(",")]

    model = build(args.shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = decode_bytes(model)
    bandwidth = measure_bandwidth(device, args.copy_mb or (2048 if device.type == "cuda" else 512))
    floor_ms = weight_bytes / bandwidth * 1000
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU x{torch.get_num_threads()} threads"
    )
    print(f"device: {name}; shape {args.shape}: {params / 1e6:,.1f}M parameters in {dtype}; "
          f"{args.frames} frames per row after a {args.prompt_tokens}-token prompt")  # fmt: skip
    print(f"bandwidth (copy): {bandwidth / 1e9:.1f} GB/s; weights read per decode step: "
          f"{weight_bytes / 1e6:,.1f} MB; floor at batch 1: {floor_ms:.2f} ms/step")  # fmt: skip

    context = args.prompt_tokens + args.frames + 2 * model.config.num_codebooks
    modes = ["graphs", "eager"] if device.type == "cuda" else ["eager"]
    for mode in modes:
        engine = engine_for(model, device, dtype, max(sizes), context, mode == "graphs")
        label = mode if mode == "eager" or engine.cuda_graphs else "eager (capture failed)"
        run_batch(engine, 1, 4, args.prompt_tokens)  # warm-up: kernels, allocator
        print(f"\n{label}: {'batch':>5} {'step ms':>8} {'frames/s':>9} {'audio s/s':>9} "
              f"{'first audio ms':>14} {'memory MB':>9}")  # fmt: skip
        single = None
        for batch in sizes:
            with contextlib.suppress(torch.cuda.OutOfMemoryError):
                row = run_batch(engine, batch, args.frames, args.prompt_tokens)
                single = row if batch == 1 else single
                print(f"{'':>{len(label) + 1}} {row['batch']:>5} {row['step_ms']:>8.2f} "
                      f"{row['frames_per_s']:>9.0f} {row['audio_s_per_s']:>9.2f} "
                      f"{row['first_audio_ms']:>14.1f} {row['memory_mb']:>9.0f}",
                      flush=True)  # fmt: skip
                continue
            print(f"{'':>{len(label) + 1}} {batch:>5} out of device memory")
        if single:
            print(f"{label}: batch-1 step {single['step_ms']:.2f} ms vs floor {floor_ms:.2f} ms: "
                  f"measured/floor = {single['step_ms'] / floor_ms:.2f}")  # fmt: skip
        del engine
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
