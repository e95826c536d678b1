"""The voice library over HTTP: `/v1/audio/voices` and `/v1/audio/voices/{name}[/audio]`.

    POST   /v1/audio/voices               multipart/form-data (name, audio file, transcript,
                                          description, consent, overwrite) or JSON (the same
                                          fields, the clip as audio_base64 or audio_url, or
                                          take_id: a remembered take's, kept exactly) -> 201
    GET    /v1/audio/voices               the library's voices, then OpenAI's names
    GET    /v1/audio/voices/{name}        one voice's metadata
    GET    /v1/audio/voices/{name}/audio  its clip (WAV; a hand-copied voice's own file)
    DELETE /v1/audio/voices/{name}        204

The body is read whole under the same size and time limits as a speech body, and only
then parsed (the standard library's MIME parser), so a slow or cut-off upload costs a
bounded read and writes nothing. Every check lives in library/manage.py.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import mimetypes
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from higgs_runpod.errors import ApiError
from higgs_runpod.fronts.http_guard import read_body
from higgs_runpod.fronts.http_state import Service
from higgs_runpod.request.openai_schema import OPENAI_VOICES, map_voice
from higgs_runpod.synthesis import audio

VOICES_ROUTE = "/v1/audio/voices"
FORM_FIELDS = ("name", "transcript", "description", "consent", "overwrite", "take_id")
_TRUE = ("1", "true", "yes", "on")


def voice_router(service: Service, dependencies: list[Any]) -> APIRouter:
    """The routes above, behind `dependencies` (the API key check)."""
    router = APIRouter(dependencies=dependencies)
    library = service.speech.library

    @router.get(VOICES_ROUTE)
    async def voices() -> dict[str, Any]:
        return await _listing(service)

    @router.post(VOICES_ROUTE)
    async def create(request: Request) -> JSONResponse:
        return await _create(service, request)

    @router.get(VOICES_ROUTE + "/{name}")
    async def get(name: str) -> dict[str, Any]:
        return (await asyncio.to_thread(library.get, name)).public()

    @router.get(VOICES_ROUTE + "/{name}/audio")
    async def clip(name: str) -> Response:
        voice = await asyncio.to_thread(library.get, name)
        data = await asyncio.to_thread(voice.audio_path.read_bytes)
        suffix = voice.audio_path.suffix.lstrip(".").lower()
        media_type = (
            audio.CONTENT_TYPES.get(suffix)
            or mimetypes.guess_type(voice.audio_path.name)[0]
            or "application/octet-stream"
        )
        return Response(data, media_type=media_type)

    @router.delete(VOICES_ROUTE + "/{name}")
    async def delete(name: str) -> Response:
        await asyncio.to_thread(library.delete, name, service.speech.forget)
        return Response(status_code=204)

    return router


async def _listing(service: Service) -> dict[str, Any]:
    """The library's voices, then OpenAI's names that no library voice takes."""
    listed = (await asyncio.to_thread(service.speech.library.list))["voices"]
    names = {voice["name"] for voice in listed}
    entries = [{"id": v["name"], "type": "library", **v} for v in listed]
    entries += [
        {
            "id": n,
            "name": n,
            "type": "openai",
            "maps_to": map_voice(n, service.settings) or "smart voice",
        }
        for n in OPENAI_VOICES
        if n not in names
    ]
    return {"voices": entries}


async def _create(service: Service, request: Request) -> JSONResponse:
    """A new voice from a form or a JSON body, read whole within the body limits."""
    settings = service.settings
    media_type = _media_type(request)
    if media_type not in ("application/json", "multipart/form-data"):
        raise ApiError(
            415,
            "Content-Type must be multipart/form-data or application/json",
            code="unsupported_media_type",
        )
    if media_type == "multipart/form-data":
        _same_origin(request)
    service.admit()  # creating may encode the clip: it takes a place like speech does
    try:
        body = await read_body(request, settings.http_max_body_bytes, settings.http_body_timeout_s)
        fields, clip = _parse(body, request.headers.get("content-type", ""), media_type)
        voice = await service.speech.library.create(fields, clip)
    finally:
        service.release()
    return JSONResponse(voice.public(), status_code=201)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _same_origin(request: Request) -> None:
    """Browsers send forms to other origins without asking first (JSON they do not): a form
    from a page of another origin is refused, so no web page can fill the library."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    host = request.headers.get("host", "")
    if origin.partition("://")[2] != host:
        raise ApiError(403, "a form upload from another origin is refused", code="cross_origin")


def _parse(body: bytes, content_type: str, media_type: str) -> tuple[dict[str, Any], bytes | None]:
    """The fields and the clip (None for JSON, which carries it as audio_base64 or audio_url)."""
    if media_type == "application/json":
        try:
            fields = json.loads(body)
        except (RecursionError, ValueError):
            raise ApiError(400, "request body must be a JSON object") from None
        if not isinstance(fields, dict):
            raise ApiError(400, "request body must be a JSON object")
        return fields, None
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise ApiError(400, "the multipart body could not be parsed (boundary missing?)")
    fields = {}
    clip: bytes | None = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "audio":
            clip = payload
        elif name in FORM_FIELDS:
            try:
                fields[name] = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"form field {name!r} is not UTF-8", param=name) from None
        else:
            raise ApiError(400, f"unknown form field {name!r}", param=name)
    if "overwrite" in fields:
        fields["overwrite"] = fields["overwrite"].strip().lower() in _TRUE
    for optional in ("description", "consent"):
        if optional in fields and not fields[optional].strip():
            del fields[optional]  # an empty form input means not given
    return fields, clip
