"""Decode throughput of a randomly initialised Higgs Audio v2 model against the bandwidth floor.

    .venv/bin/python bench/throughput.py --shape cpu          # this machine, a few minutes
    .venv/bin/python bench/throughput.py --shape real         # the 3B+2.2B shape, on a GPU

The model has the real architecture at a chosen size and is built in memory (nothing is
downloaded). Its audio head never picks the stream EOS, so every row generates exactly
--frames frames: the figures depend on the shape and the batch size, not on what the
random weights happen to say. For each batch size it prints decode steps per second, seconds
of audio per second (all rows together), time to the first complete frame and device memory.

The floor: one decode step at batch 1 must read every weight it uses once (attention, the
audio MLP, the audio head and embeddings; the text MLP and text embeddings are skipped for
audio tokens), so step time >= those bytes / memory bandwidth. The bandwidth is measured in
the same run by copying a large tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch
from transformers import GenerationConfig, HiggsAudioV2Config, HiggsAudioV2ForConditionalGeneration

from higgs_runpod.streaming import DelayAligner
from higgs_runpod.tiny import TINY_SHAPE, build_model, build_text_tokenizer

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
    """The released shape, initialised where it runs (5B parameters on a CPU would be slow);
    its audio head is sharpened and never picks stream BOS/EOS, so no row stops early."""
    config = HiggsAudioV2Config(**SHAPES["real"], codebook_size=1026, max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = HiggsAudioV2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        head = model.audio_lm_head.weight.view(config.num_codebooks, config.codebook_size, -1)
        head.mul_(100.0)
        head[:, config.audio_stream_bos_id, :] = 0.0
        head[:, config.audio_stream_eos_id, :] = 0.0
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


class Clock:
    """Forward pre-hook: times each model call and the first complete frame of row 0."""

    def __init__(self, config: HiggsAudioV2Config) -> None:
        self.times: list[float] = []
        self.first_frame: float | None = None
        self.aligner = DelayAligner(config.audio_stream_bos_id, config.audio_stream_eos_id)

    def __call__(self, module, args, kwargs) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1 or self.first_frame is not None:
            return
        if self.aligner.push(kwargs["audio_input_ids"][0, -1].cpu()).shape[0]:
            self.first_frame = self.times[-1]


def run_batch(model, batch: int, frames: int, prompt_tokens: int, device: torch.device) -> dict:
    config = model.config
    steps = frames + config.num_codebooks  # BOS, the delay pattern's tail, EOS not reached
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(20, 400, (1, prompt_tokens - 1), generator=generator)
    prompt = torch.cat([text, torch.tensor([[config.audio_bos_token_id]])], dim=1)
    input_ids = prompt.repeat(batch, 1).to(device)
    generation = GenerationConfig(
        max_new_tokens=steps, do_sample=False,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )  # fmt: skip
    clock = Clock(config)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    hook = model.register_forward_pre_hook(clock, with_kwargs=True)
    try:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                generation_config=generation,
            )  # fmt: skip
        sync(device)
        total = time.perf_counter() - start
    finally:
        hook.remove()
    step_times = [b - a for a, b in zip(clock.times[1:], clock.times[2:], strict=False)]
    memory = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    decode_steps = len(clock.times)  # one step per forward: the prefill's, then one each
    return {
        "batch": batch,
        "steps": decode_steps,
        "step_ms": statistics.median(step_times) * 1000 if step_times else float("nan"),
        "steps_per_s": decode_steps / total,
        "audio_s_per_s": batch * frames / FRAME_RATE / total,
        "first_audio_ms": ((clock.first_frame or start) - start) * 1000,
        "memory_mb": memory / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--frames", type=int, default=50, help="frames each row generates")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--copy-mb", type=int, default=None, help="bandwidth probe size")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )  # fmt: skip

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

    run_batch(model, 1, 4, args.prompt_tokens, device)  # warm-up: kernels, allocator
    print(f"{'batch':>5} {'steps':>5} {'step ms':>8} {'steps/s':>8} {'audio s/s':>9} "
          f"{'first audio ms':>14} {'memory MB':>9}")  # fmt: skip
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            row = run_batch(model, batch, args.frames, args.prompt_tokens, device)
            rows.append(row)
            print(f"{row['batch']:>5} {row['steps']:>5} {row['step_ms']:>8.2f} "
                  f"{row['steps_per_s']:>8.1f} {row['audio_s_per_s']:>9.2f} "
                  f"{row['first_audio_ms']:>14.1f} {row['memory_mb']:>9.0f}",
                  flush=True)  # fmt: skip
            continue
        print(f"{batch:>5} out of device memory")
    single = next((r for r in rows if r["batch"] == 1), None)
    if single:
        print(f"batch-1 step {single['step_ms']:.2f} ms vs floor {floor_ms:.2f} ms: "
              f"measured/floor = {single['step_ms'] / floor_ms:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
