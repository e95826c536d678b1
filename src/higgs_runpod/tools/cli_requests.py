"""`synth` (in-process) and `speak` (through an endpoint): one request, its audio to a file."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from pathlib import Path

from higgs_runpod.errors import ClientError, JobFailed
from higgs_runpod.request.schema import AUDIO_FORMATS
from higgs_runpod.settings import load_client_settings, load_settings
from higgs_runpod.tools.client import (
    Endpoint,
    JobUpdate,
    key_goes_to,
    save_audio,
)

_SUFFIX_ALIASES = {"ogg": "opus", "m4a": "aac", "raw": "pcm"}
_REQUEST_FIELDS = ("scene", "seed", "temperature", "top_p", "top_k", "max_new_tokens",
                   "sample_rate")  # fmt: skip


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The request fields that `synth` and `speak` share (see synth_input)."""
    parser.add_argument("text")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--format", choices=AUDIO_FORMATS, help="default: from the file extension")
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


def _format_for(path: Path, requested: str | None) -> str:
    if requested:
        return requested
    suffix = path.suffix.lower().lstrip(".")
    fmt = _SUFFIX_ALIASES.get(suffix, suffix)
    if fmt not in AUDIO_FORMATS:
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
    for name in _REQUEST_FIELDS:
        if getattr(args, name) is not None:
            job_input[name] = getattr(args, name)
    return job_input


def cmd_synth(args: argparse.Namespace) -> int:
    from higgs_runpod.fronts.runpod import Worker
    from higgs_runpod.service.speech import SpeechService

    worker = Worker(SpeechService(load_settings()))
    result = asyncio.run(worker.handle({"id": "synth", "input": synth_input(args)}))
    if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)  # noqa: T201
        return 1
    save_audio(result, args.output)  # inline, or from the bucket when S3 is configured
    print(  # noqa: T201
        f"wrote {args.output} ({result['duration_s']:.2f} s, {result['format']}, "
        f"seed {result['seed']}, {result['timings_ms']['total']:.0f} ms)"
    )
    return 0


class _Progress:
    """Prints one line per change of a job's status, progress or queue length (not per poll)."""

    def __init__(self) -> None:
        self.state: tuple[str, object] | None = None
        self.queued: int | None = None

    def __call__(self, update: JobUpdate) -> None:
        state = (update.status, update.progress)
        if state == self.state and update.queued in (None, self.queued):
            return
        self.state = state
        if update.queued is not None:
            self.queued = update.queued
        line = f"job {update.job_id}: {update.status} ({update.elapsed_s:.0f} s)"
        if update.queued is not None:
            line += f", {update.queued} job(s) queued on the endpoint"
        if update.progress is not None:
            line += f", {update.progress}"
        print(line, file=sys.stderr)  # noqa: T201


def _speak_endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The endpoint `speak` calls; None (after saying why) when it cannot be called."""
    api_key = load_client_settings().runpod_key
    if args.endpoint and not api_key:
        print("error: set RUNPOD_API_KEY to call a RunPod endpoint", file=sys.stderr)  # noqa: T201
        return None
    if not args.url:
        return Endpoint.from_id(args.endpoint, api_key, max_wait_s=args.max_wait)
    if api_key and not key_goes_to(args.url):
        print(  # noqa: T201
            "note: RUNPOD_API_KEY is not sent to this URL (only to https://api.runpod.ai)",
            file=sys.stderr,
        )
    return Endpoint(args.url, api_key, max_wait_s=args.max_wait)


def cmd_speak(args: argparse.Namespace) -> int:
    """Call a deployed endpoint (or a local `serve`) and write the audio to a file."""
    job_input = synth_input(args)
    if args.delivery:
        job_input["output"] = args.delivery
    if args.stream:
        job_input["stream"] = True
    endpoint = _speak_endpoint(args)
    if endpoint is None:
        return 2
    try:
        with endpoint:
            job_id = endpoint.submit(job_input)
            try:
                output = endpoint.wait(job_id, on_update=_Progress())
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
