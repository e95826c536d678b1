"""The `higgs-runpod` command: serve, worker, http, start, synth, voices, make-tiny-model."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import sys
from pathlib import Path

from .settings import load_settings

log = logging.getLogger("higgs_runpod")

FORMATS = ("wav", "flac", "mp3", "opus", "aac", "pcm")


def _start_runpod(rp_args: list[str]) -> None:
    """Load the model (unless LAZY_LOAD), then hand the handler to RunPod's worker loop."""
    import runpod

    from .handler import get_worker, handler

    worker = get_worker()
    if not worker.settings.lazy_load:
        log.info("loaded in %.1f s", worker.engine.load())
    sys.argv = [sys.argv[0], *rp_args]  # runpod reads its own flags from argv
    runpod.serverless.start({"handler": handler})


def cmd_serve(args: argparse.Namespace) -> int:
    _start_runpod(["--rp_serve_api", "--rp_api_host", args.host, "--rp_api_port", str(args.port)])
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    _start_runpod([])
    return 0


def _serve_http(host: str | None, port: int | None) -> None:
    """The OpenAI-compatible HTTP server (http_api) under uvicorn; the model loads meanwhile."""
    import uvicorn

    from .http_api import create_app

    settings = load_settings()
    host = host or settings.http_host
    port = port or settings.port
    if settings.higgs_api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "HIGGS_API_KEY is not set: anyone who reaches %s:%d can use the API", host, port
        )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)


def cmd_http(args: argparse.Namespace) -> int:
    _serve_http(args.host, args.port)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """The image's command: WORKER_MODE=queue (RunPod's job queue) or http (load balancing)."""
    if load_settings().worker_mode == "http":
        _serve_http(None, None)
    else:
        _start_runpod([])
    return 0


def _format_for(path: Path, requested: str | None) -> str:
    if requested:
        return requested
    suffix = path.suffix.lower().lstrip(".")
    aliases = {"ogg": "opus", "m4a": "aac", "raw": "pcm"}
    fmt = aliases.get(suffix, suffix)
    if fmt not in FORMATS:
        raise SystemExit(f"cannot tell the format from {path.name!r}; pass --format")
    return fmt


def synth_input(args: argparse.Namespace) -> dict:
    """The job input that `synth` sends through the handler (the same path as a job)."""
    job_input: dict = {"text": args.text, "format": _format_for(args.output, args.format)}
    if args.voice_file:
        clip = base64.b64encode(args.voice_file.read_bytes()).decode("ascii")
        job_input["voice"] = {"audio_base64": clip, "transcript": args.transcript or ""}
    elif args.voice:
        job_input["voice"] = args.voice
    for name in ("scene", "seed", "temperature", "top_p", "top_k", "max_new_tokens",
                 "sample_rate"):  # fmt: skip
        if getattr(args, name) is not None:
            job_input[name] = getattr(args, name)
    return job_input


def cmd_synth(args: argparse.Namespace) -> int:
    from .handler import Worker

    worker = Worker(load_settings())
    result = asyncio.run(worker.handle({"id": "synth", "input": synth_input(args)}))
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)  # noqa: T201
        return 1
    args.output.write_bytes(base64.b64decode(result["audio_base64"]))
    print(  # noqa: T201
        f"wrote {args.output} ({result['duration_s']:.2f} s, {result['format']}, "
        f"seed {result['seed']}, {result['timings_ms']['total']:.0f} ms)"
    )
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    from .voices import list_library

    settings = load_settings()
    voices = list_library(settings.voices_path)
    if not voices:
        print(f"no voices in {settings.voices_path} (add NAME.wav with NAME.txt)")  # noqa: T201
    for voice in voices:
        print(f"{voice.name}\t{voice.audio_path}")  # noqa: T201
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_model

    model_dir, tokenizer_dir = make_tiny_model(args.directory)
    print(  # noqa: T201
        f"Wrote a tiny random Higgs Audio v2 checkpoint (it speaks noise):\n"
        f"  MODEL_PATH={model_dir}\n  TOKENIZER_PATH={tokenizer_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="higgs-runpod", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the worker behind RunPod's local API server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run the worker on RunPod's job queue")
    worker.set_defaults(func=cmd_worker)

    http = commands.add_parser("http", help="run the OpenAI-compatible HTTP speech API")
    http.add_argument("--host", help="default: HTTP_HOST (0.0.0.0)")
    http.add_argument("--port", type=int, help="default: PORT (8000)")
    http.set_defaults(func=cmd_http)

    start = commands.add_parser("start", help="run what WORKER_MODE says (queue or http)")
    start.set_defaults(func=cmd_start)

    synth = commands.add_parser("synth", help="synthesise one text in-process to a file")
    synth.add_argument("text")
    synth.add_argument("-o", "--output", type=Path, required=True)
    synth.add_argument("--format", choices=FORMATS, help="default: from the file extension")
    voice = synth.add_mutually_exclusive_group()
    voice.add_argument("--voice", help="a voice from the library")
    voice.add_argument("--voice-file", type=Path, help="a reference clip to clone")
    synth.add_argument("--transcript", help="what the reference clip says")
    synth.add_argument("--scene")
    synth.add_argument("--seed", type=int)
    synth.add_argument("--temperature", type=float)
    synth.add_argument("--top-p", type=float)
    synth.add_argument("--top-k", type=int)
    synth.add_argument("--max-new-tokens", type=int)
    synth.add_argument("--sample-rate", type=int)
    synth.set_defaults(func=cmd_synth)

    voices = commands.add_parser("voices", help="list the voice library (VOICES_PATH)")
    voices.set_defaults(func=cmd_voices)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random checkpoint")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
