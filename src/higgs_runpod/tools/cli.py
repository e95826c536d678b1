"""The `higgs-runpod` command and its subcommands (see `higgs-runpod --help`)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from higgs_runpod.container.health import mark_ready
from higgs_runpod.settings import load_settings

log = logging.getLogger("higgs_runpod")

FORMATS = ("wav", "flac", "mp3", "opus", "aac", "pcm")


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
            log.info("loaded in %.1f s", worker.engine.load())
            log.info("library voices encoded: %d", worker.warm_voices())
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
    from higgs_runpod.fronts.runpod import Worker

    worker = Worker(load_settings())
    result = asyncio.run(worker.handle({"id": "synth", "input": synth_input(args)}))
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)  # noqa: T201
        return 1
    from higgs_runpod.tools.client import save_audio

    save_audio(result, args.output)  # inline, or from the bucket when S3 is configured
    print(  # noqa: T201
        f"wrote {args.output} ({result['duration_s']:.2f} s, {result['format']}, "
        f"seed {result['seed']}, {result['timings_ms']['total']:.0f} ms)"
    )
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    """Call a deployed endpoint (or a local `serve`) and write the audio to a file."""
    from higgs_runpod.tools.client import (
        ClientError,
        Endpoint,
        JobFailed,
        JobUpdate,
        key_goes_to,
        save_audio,
    )

    job_input = synth_input(args)
    if args.delivery:
        job_input["output"] = args.delivery
    if args.stream:
        job_input["stream"] = True
    api_key = os.environ.get("RUNPOD_API_KEY")
    if args.endpoint and not api_key:
        print("error: set RUNPOD_API_KEY to call a RunPod endpoint", file=sys.stderr)  # noqa: T201
        return 2
    if args.url:
        if api_key and not key_goes_to(args.url):
            print(  # noqa: T201
                "note: RUNPOD_API_KEY is not sent to this URL (only to https://api.runpod.ai)",
                file=sys.stderr,
            )
        endpoint = Endpoint(args.url, api_key, max_wait_s=args.max_wait)
    else:
        endpoint = Endpoint.from_id(args.endpoint, api_key, max_wait_s=args.max_wait)
    last: dict[str, object] = {"state": None, "queued": None}

    def show(update: JobUpdate) -> None:
        """One line per change of status, progress or queue length (not per poll)."""
        state = (update.status, update.progress)
        if state == last["state"] and update.queued in (None, last["queued"]):
            return
        last["state"] = state
        if update.queued is not None:
            last["queued"] = update.queued
        line = f"job {update.job_id}: {update.status} ({update.elapsed_s:.0f} s)"
        if update.queued is not None:
            line += f", {update.queued} job(s) queued on the endpoint"
        if update.progress is not None:
            line += f", {update.progress}"
        print(line, file=sys.stderr)  # noqa: T201

    try:
        with endpoint:
            job_id = endpoint.submit(job_input)
            try:
                output = endpoint.wait(job_id, on_update=show)
            except KeyboardInterrupt:
                done = "was cancelled" if endpoint.cancel(job_id) else "could not be cancelled"
                print(f"interrupted: job {job_id} {done}", file=sys.stderr)  # noqa: T201
                return 130
        size = save_audio(output, args.output)
    except (JobFailed, ClientError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1
    where = f" from {output['s3_uri']}" if output.get("s3_uri") else ""
    print(  # noqa: T201
        f"wrote {args.output} ({size} bytes{where}, {output.get('duration_s', 0):.2f} s, "
        f"{output.get('format')}, seed {output.get('seed')})"
    )
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    """Manage a voice library: a queue endpoint's (--endpoint), a server's (--url), or the
    one on VOICES_PATH (neither: for filling a volume before any worker runs)."""
    from higgs_runpod.errors import RequestError
    from higgs_runpod.tools.client import ClientError, Endpoint, JobFailed, Voices

    action = args.voices_command or "list"
    try:
        if args.endpoint or args.url:
            if args.endpoint:
                api_key = os.environ.get("RUNPOD_API_KEY")
                if not api_key:
                    print("error: set RUNPOD_API_KEY to call a RunPod endpoint", file=sys.stderr)  # noqa: T201
                    return 2
                voices = Voices(endpoint=Endpoint.from_id(args.endpoint, api_key))
            elif args.http:
                voices = Voices(http_url=args.url, http_key=os.environ.get("HIGGS_API_KEY"))
            else:
                voices = Voices(endpoint=Endpoint(args.url, os.environ.get("RUNPOD_API_KEY")))
            with voices:
                return _voices_remote(voices, action, args)
        return _voices_local(action, args)
    except (ClientError, JobFailed, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1


def _voices_remote(voices: Any, action: str, args: argparse.Namespace) -> int:
    if action == "list":
        _print_voices([v for v in voices.list() if v.get("type", "library") == "library"])
    elif action == "add":
        fields = {"description": args.description, "consent": args.consent}
        if args.overwrite:
            fields["overwrite"] = True
        made = voices.add(args.name, args.clip.read_bytes(), args.transcript, **fields)
        print(json.dumps(made))  # noqa: T201
    elif action == "get":
        print(json.dumps(voices.get(args.name)))  # noqa: T201
    else:
        voices.remove(args.name)
        print(f"deleted {args.name}")  # noqa: T201
    return 0


def _voices_local(action: str, args: argparse.Namespace) -> int:
    from higgs_runpod.library.manage import VoiceService
    from higgs_runpod.request.voices import VoiceResolver

    settings = load_settings()
    service = VoiceService(settings, VoiceResolver(settings))
    if action == "list":
        voices = service.list()["voices"]
        if not voices:
            print(f"no voices in {settings.voices_path} (add one: voices add NAME CLIP)")  # noqa: T201
        _print_voices(voices)
    elif action == "add":
        fields = {"name": args.name, "transcript": args.transcript, "overwrite": args.overwrite,
                  "description": args.description, "consent": args.consent}  # fmt: skip
        given = {key: value for key, value in fields.items() if value is not None}
        made = asyncio.run(service.create(given, args.clip.read_bytes()))
        print(json.dumps(made.public()))  # noqa: T201
    elif action == "get":
        print(json.dumps(service.get(args.name).public()))  # noqa: T201
    else:
        service.delete(args.name)
        print(f"deleted {args.name}")  # noqa: T201
    return 0


def _print_voices(voices: list[dict[str, Any]]) -> None:
    for voice in voices:
        duration = f"{voice['duration_s']:.1f} s" if voice.get("duration_s") else "?"
        print(f"{voice['name']}\t{voice['source']}\t{duration}\t{voice['transcript'][:60]}")  # noqa: T201


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

    settings = load_settings()
    key = settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else None
    return run(
        args.config,
        api_key=key,
        api_url=settings.runpod_api_url,
        dry_run=args.dry_run,
        image=args.image,
    )


def _add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request fields that `synth` and `speak` share (see synth_input)."""
    parser.add_argument("text")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--format", choices=FORMATS, help="default: from the file extension")
    voice = parser.add_mutually_exclusive_group()
    voice.add_argument("--voice", help="a voice from the library")
    voice.add_argument("--voice-file", type=Path, help="a reference clip to clone")
    parser.add_argument("--transcript", help="what the reference clip says")
    parser.add_argument("--scene")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--sample-rate", type=int)


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
    _add_request_arguments(synth)
    synth.set_defaults(func=cmd_synth)

    speak = commands.add_parser(
        "speak", help="call a deployed endpoint (or a local serve) and save the audio"
    )
    _add_request_arguments(speak)
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

    voices = commands.add_parser(
        "voices",
        help="manage the voice library (VOICES_PATH, a queue endpoint, or an HTTP server)",
        description="With --endpoint: a RunPod queue endpoint. With --url: a local serve, or "
        "an HTTP server with --http (key from HIGGS_API_KEY). With neither: VOICES_PATH itself.",
    )
    where = voices.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="RunPod endpoint id (needs RUNPOD_API_KEY)")
    where.add_argument("--url", help="base URL of a local serve, or of an HTTP server (--http)")
    voices.add_argument("--http", action="store_true", help="--url is an HTTP-mode server")
    actions = voices.add_subparsers(dest="voices_command")
    add = actions.add_parser("add", help="add a voice from a clip and its transcript")
    add.add_argument("name")
    add.add_argument("clip", type=Path)
    add.add_argument("--transcript", required=True, help="what the clip says")
    add.add_argument("--description")
    add.add_argument("--consent", help="who agreed to the cloning, and how")
    add.add_argument("--overwrite", action="store_true", help="replace a voice of that name")
    actions.add_parser("list", help="list the library (the default)")
    for verb, about in (("get", "show one voice"), ("rm", "delete a voice and its codes")):
        actions.add_parser(verb, help=about).add_argument("name")
    voices.set_defaults(func=cmd_voices)

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
    return parser


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
