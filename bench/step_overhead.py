"""Cost of one decode step: the engine's loop against the model's bare forward and generate.

On a tiny random model with the real layer count (28) every step is mostly per-layer
overhead, which is what this compares. Three figures, per decoded step:

- bare forward: `model(audio_input_ids=<one step>, cache=DynamicCache)` in a plain loop,
  the least a step through transformers' forward can cost;
- engine: a whole request through `Engine.synthesize` (its decode steps, sampling, the
  readback and the aligner), divided by its steps;
- generate: `model.generate` on the same prompt, (long run - short run) / extra steps.

Rounds alternate the three so that a busy machine slows all of them alike; medians are
printed with the ratio engine / bare forward (goal: at most 1.15).

    .venv/bin/python bench/step_overhead.py [--layers 28] [--steps 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, GenerationConfig

from higgs_runpod.request.prompts import build_conversation
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine, SamplingParams
from higgs_runpod.weights.tiny import TINY_SHAPE, make_tiny_model


def bare_forward_ms(engine: Engine, inputs: dict, steps: int) -> float:
    model = engine.model
    assert model is not None
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        step = torch.zeros((1, 1, model.config.num_codebooks), dtype=torch.long)
        position = inputs["input_ids"].shape[1]
        started = time.perf_counter()
        for index in range(steps):
            ids = torch.tensor([[position + index]])
            logits = model(audio_input_ids=step, cache=cache, use_cache=True, position_ids=ids)
            step = logits.logits[:, -1].view(1, 1, model.config.num_codebooks, -1).argmax(-1)
        return (time.perf_counter() - started) * 1000.0 / steps


def engine_ms(engine: Engine, steps: int) -> float:
    params = SamplingParams(temperature=0.0, ras_win_len=0, max_new_tokens=steps + 1)
    result = engine.synthesize(build_conversation("Hello there."), params)
    return result.generate_ms / result.generated_tokens


def generate_ms(engine: Engine, inputs: dict, steps: int) -> float:
    model = engine.model
    assert model is not None

    def run(new_tokens: int) -> float:
        config = GenerationConfig.from_dict(model.generation_config.to_dict())
        config.update(max_new_tokens=new_tokens, do_sample=False)
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(**inputs, generation_config=config)
            return time.perf_counter() - started

    short, long = run(steps // 4), run(steps + steps // 4)
    return (long - short) * 1000.0 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figures compare loops, not thread scheduling
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tokenizer_dir = make_tiny_model(
            Path(tmp), shape={**TINY_SHAPE, "num_hidden_layers": args.layers}
        )
        settings = load_settings({"MODEL_PATH": str(model_dir),
                                  "TOKENIZER_PATH": str(tokenizer_dir)})  # fmt: skip
        engine = Engine(settings)
        engine.load()
        inputs = engine.prompt_inputs(build_conversation("Hello there."))
        figures: dict[str, list[float]] = {"bare forward": [], "engine": [], "generate": []}
        engine_ms(engine, 20)  # warm-up
        for _ in range(args.rounds):
            figures["bare forward"].append(
                engine.call(lambda: bare_forward_ms(engine, inputs, args.steps))
            )
            figures["engine"].append(engine_ms(engine, args.steps))
            figures["generate"].append(engine.call(lambda: generate_ms(engine, inputs, args.steps)))
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(f"tiny model, {args.layers} layers, {args.steps} steps, {args.rounds} rounds, one thread")
    for name, value in medians.items():
        runs = ", ".join(f"{v:.2f}" for v in figures[name])
        print(f"  {name:13s} {value:7.3f} ms/step  (runs: {runs})")
    bare = medians["bare forward"]
    print(f"  engine / bare forward   = {medians['engine'] / bare:.3f}  (goal <= 1.15)")
    print(f"  generate / bare forward = {medians['generate'] / bare:.3f}")


if __name__ == "__main__":
    main()
