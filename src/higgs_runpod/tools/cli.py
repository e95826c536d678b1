"""The `higgs-runpod` command and its subcommands (see `higgs-runpod --help`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from higgs_runpod.container.health import mark_ready
from higgs_runpod.settings import load_client_settings, load_settings
from higgs_runpod.tools.cli_requests import add_request_arguments, cmd_speak, cmd_synth
from higgs_runpod.tools.cli_voices import add_voices_command

log = logging.getLogger("higgs_runpod")


def _start_runpod(rp_args: list[str]) -> int:
    """Make sure both checkpoints are on disk (downloading them once, whichever worker comes
    first), load the model (unless LAZY_LOAD), then hand the handler to RunPod's worker loop.
    A checkpoint that cannot be had fails the start with its message (exit status 1)."""
    from higgs_runpod.errors import ModelNotFoundError
    from higgs_runpod.weights.model_store import ensure_checkpoints

    try:  # before the heavy imports, so that a start that cannot succeed fails fast
        for ready in ensure_checkpoints(load_settings())[1]:
            log.info("%s", ready.describe())
    except ModelNotFoundError as error:
        log.error("cannot start: %s", error)
        return 1

    # RunPod's logger defaults to DEBUG and then prints every job's whole output: base64
    # audio by the megabyte and presigned URLs. It reads the level once, at import.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    import runpod

    from higgs_runpod.fronts.runpod import get_worker, handler, stream_handler

    worker = get_worker()
    if not worker.settings.lazy_load:
        try:
            log.info("loaded in %.1f s", worker.service.engine.load())
            log.info("library voices encoded: %d", worker.service.warm_voices())
        except ModelNotFoundError as error:
            log.error("cannot start: %s", error)
            return 1
    mark_ready(worker.settings.ready_file)
    sys.argv = [sys.argv[0], *rp_args]  # runpod reads its own flags from argv
    # Up to MAX_BATCH_SIZE jobs at once: those arriving together are generated in one batch.
    jobs_at_once = worker.settings.max_batch_size
    config: dict = {"concurrency_modifier": lambda current: jobs_at_once}
    if worker.settings.enable_streaming:
        runpod.serverless.start(
            {**config, "handler": stream_handler, "return_aggregate_stream": True}
        )
    else:
        runpod.serverless.start({**config, "handler": handler})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return _start_runpod(
        ["--rp_serve_api", "--rp_api_host", args.host, "--rp_api_port", str(args.port)]
    )


def cmd_worker(args: argparse.Namespace) -> int:
    return _start_runpod([])


def _serve_http(host: str | None, port: int | None) -> int:
    """The OpenAI-compatible HTTP server (http_api) under uvicorn; the model loads meanwhile.
    It refuses to start beyond loopback without HIGGS_API_KEY (unless HTTP_ALLOW_NO_KEY)."""
    import uvicorn

    from higgs_runpod.fronts.http_guard import listen_refusal, uvicorn_config

    settings = load_settings()
    host = host or settings.http_host
    port = port or settings.port
    refusal = listen_refusal(settings, host)
    if refusal is not None:
        log.error("cannot start: %s", refusal)
        return 1
    from higgs_runpod.fronts.http_api import (
        create_app,  # the model's imports take seconds: after the checks
    )

    if settings.higgs_api_key is None and settings.http_allow_no_key:
        log.warning("HIGGS_API_KEY is not set: whoever reaches %s:%d can use the API", host, port)
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, host, port))
    server.run()
    return 0 if server.started else 1  # it did not start: the port is taken, say


def cmd_http(args: argparse.Namespace) -> int:
    return _serve_http(args.host, args.port)


def cmd_start(args: argparse.Namespace) -> int:
    """The image's command: WORKER_MODE=queue (RunPod's job queue) or http (load balancing)."""
    if load_settings().worker_mode == "http":
        return _serve_http(None, None)
    return _start_runpod([])


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    if args.published_layout:
        from higgs_runpod.weights.tiny_published import make_published_layout_model as make
    else:
        from higgs_runpod.weights.tiny import make_tiny_model as make

    model_dir, tokenizer_dir = make(args.directory)
    print(  # noqa: T201
        f"Wrote a tiny random Higgs Audio v2 checkpoint (it speaks noise):\n"
        f"  MODEL_PATH={model_dir}\n  TOKENIZER_PATH={tokenizer_dir}"
    )
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch both checkpoints into MODEL_PATH and TOKENIZER_PATH (pre-warming a volume)."""
    from higgs_runpod.errors import ModelNotFoundError
    from higgs_runpod.weights.model_store import ensure_checkpoints

    try:
        _, readies = ensure_checkpoints(load_settings())
    except ModelNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    for ready in readies:
        print(ready.describe())  # noqa: T201
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from higgs_runpod.tools.deploy import run

    settings = load_client_settings()
    return run(
        args.config,
        api_key=settings.runpod_key,
        api_url=settings.runpod_api_url,
        dry_run=args.dry_run,
        image=args.image,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="higgs-runpod", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_server_commands(commands)
    _add_request_commands(commands)
    add_voices_command(commands)
    _add_volume_commands(commands)
    return parser


def _add_server_commands(commands: Any) -> None:
    """serve, worker, http, start: the ways to run the worker."""
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


def _add_request_commands(commands: Any) -> None:
    """synth (in-process) and speak (through an endpoint)."""
    synth = commands.add_parser("synth", help="synthesise one text in-process to a file")
    add_request_arguments(synth)
    synth.set_defaults(func=cmd_synth)

    speak = commands.add_parser(
        "speak", help="call a deployed endpoint (or a local serve) and save the audio"
    )
    add_request_arguments(speak)
    target = speak.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="RunPod endpoint id (needs RUNPOD_API_KEY)")
    target.add_argument(
        "--url", help="endpoint base URL: https://api.runpod.ai/v2/ID or http://127.0.0.1:8000"
    )
    speak.add_argument(
        "--stream", action="store_true", help="stream (endpoints with ENABLE_STREAMING; wav/pcm)"
    )
    speak.add_argument(
        "--delivery", choices=("inline", "s3"), help="request field output (default: worker's)"
    )
    speak.add_argument(
        "--max-wait", type=float, default=900.0, help="seconds before giving up (and cancelling)"
    )
    speak.set_defaults(func=cmd_speak)


def _add_volume_commands(commands: Any) -> None:
    """make-tiny-model, download, deploy: checkpoints and the endpoint itself."""
    tiny = commands.add_parser("make-tiny-model", help="write a tiny random checkpoint")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument(
        "--published-layout",
        action="store_true",
        help="the published checkpoint's files and token ids (8 x 1024 codes; about 15 MB)",
    )
    tiny.set_defaults(func=cmd_make_tiny_model)

    download = commands.add_parser(
        "download",
        help="fetch MODEL_REPO and TOKENIZER_REPO into MODEL_PATH and TOKENIZER_PATH",
        description="Download both checkpoints once (safe while workers start on the same "
        "volume) and verify them; exits 0 when both are complete.",
    )
    download.set_defaults(func=cmd_download)

    deploy = commands.add_parser(
        "deploy", help="create or update the RunPod template and endpoint (RUNPOD_API_KEY)"
    )
    deploy.add_argument("--config", type=Path, default=Path("deploy/endpoint.json"))
    deploy.add_argument("--image", help="override template.image, e.g. ghcr.io/me/repo:sha-abc")
    deploy.add_argument(
        "--dry-run", action="store_true", help="print the requests as JSON lines, send nothing"
    )
    deploy.set_defaults(func=cmd_deploy)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request URL at INFO, presigned query strings (signatures) included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # huggingface_hub's client: per request
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
