"""`voices`: manage a voice library through a queue endpoint (--endpoint), a server (--url),
or on VOICES_PATH itself (neither: for filling a volume before any worker runs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from higgs_runpod.errors import ClientError, JobFailed, RequestError
from higgs_runpod.settings import load_client_settings, load_settings
from higgs_runpod.tools.client import Endpoint
from higgs_runpod.tools.library_client import Voices


def add_voices_command(commands: Any) -> None:
    """The `voices` subcommand and its actions (`commands`: the parser's subparsers)."""
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
    add = actions.add_parser(
        "add", help="add a voice from a clip and its transcript, or from a remembered take"
    )
    add.add_argument("name")
    add.add_argument("clip", type=Path, nargs="?", help="the clip (none with --take)")
    add.add_argument(
        "--take", metavar="ID", help="a take_id of a request with remember_take: kept exactly"
    )
    add.add_argument("--transcript", help="what the clip says (a take's: its text by default)")
    add.add_argument("--description")
    add.add_argument("--consent", help="who agreed to the cloning, and how")
    add.add_argument("--overwrite", action="store_true", help="replace a voice of that name")
    actions.add_parser("list", help="list the library (the default)")
    for verb, about in (("get", "show one voice"), ("rm", "delete a voice and its codes")):
        actions.add_parser(verb, help=about).add_argument("name")
    voices.set_defaults(func=cmd_voices)


def cmd_voices(args: argparse.Namespace) -> int:
    """Manage a voice library: a queue endpoint's (--endpoint), a server's (--url), or the
    one on VOICES_PATH (neither: for filling a volume before any worker runs)."""
    action = args.voices_command or "list"
    if action == "add" and (problem := _add_problem(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)  # noqa: T201
        return 2
    try:
        if not (args.endpoint or args.url):
            return _voices_local(action, args)
        client = load_client_settings()
        if args.endpoint:
            if not client.runpod_key:
                print("error: set RUNPOD_API_KEY to call a RunPod endpoint", file=sys.stderr)  # noqa: T201
                return 2
            voices = Voices(endpoint=Endpoint.from_id(args.endpoint, client.runpod_key))
        elif args.http:
            voices = Voices(http_url=args.url, http_key=client.higgs_key)
        else:
            voices = Voices(endpoint=Endpoint(args.url, client.runpod_key))
        with voices:
            return _voices_remote(voices, action, args)
    except (ClientError, JobFailed, RequestError) as error:
        print(f"error: {error}", file=sys.stderr)  # noqa: T201
        return 1


def _add_problem(args: argparse.Namespace) -> str | None:
    """Why `voices add`'s arguments cannot make a voice, or None."""
    if (args.clip is None) == (args.take is None):
        return "give a clip or --take ID (a remembered take), not both"
    if args.clip is not None and args.transcript is None:
        return "--transcript is required with a clip"
    return None


def _voices_remote(voices: Voices, action: str, args: argparse.Namespace) -> int:
    if action == "list":
        _print_voices([v for v in voices.list() if v.get("type", "library") == "library"])
    elif action == "add":
        fields = {"description": args.description, "consent": args.consent}
        if args.overwrite:
            fields["overwrite"] = True
        if args.take is not None:
            made = voices.keep(args.name, args.take, transcript=args.transcript, **fields)
        else:
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
                  "description": args.description, "consent": args.consent,
                  "take_id": args.take}  # fmt: skip
        given = {key: value for key, value in fields.items() if value is not None}
        clip = args.clip.read_bytes() if args.clip is not None else None
        made = asyncio.run(service.create(given, clip))
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
