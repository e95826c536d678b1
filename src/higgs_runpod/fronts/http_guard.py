"""What the HTTP server checks before a request reaches its work, and how it bounds sockets.

    socket --GuardedH11Protocol: header deadline, idle keep-alive, HTTP_MAX_CONNECTIONS-->
        (a WebSocket: GuardedWebSocketProtocol, messages at most HTTP_MAX_BODY_BYTES)
        CloseUnread: an answer sent before the body ended closes the connection -->
        route: authorize (401) -> require_json (415) -> admit (429) -> read_json (413, 408, 400)

Every refusal is an `ApiError` (errors.py), which leaves in OpenAI's shape (http_errors.py).
uvicorn has no deadline for headers and none for bodies, and a connection whose request
body is still arriving stays open after the answer (each byte resets its keep-alive
timer): without these, a client dripping a byte a second holds a socket for ever.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from functools import partial
from typing import Any

import uvicorn
from fastapi import Request, WebSocket
from starlette.requests import ClientDisconnect, HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode

from higgs_runpod.errors import ApiError, ClientGone
from higgs_runpod.settings import Settings


def bearer_allowed(settings: Settings) -> bool:
    """Whether `Authorization: Bearer` may carry HIGGS_API_KEY.

    Behind RunPod's load balancer (RunPod sets RUNPOD_ENDPOINT_ID) that header carries the
    caller's RunPod key, which the gateway checks: the worker's own key goes in X-API-Key.
    """
    if settings.http_bearer_auth == "auto":
        return settings.runpod_endpoint_id is None
    return settings.http_bearer_auth == "on"


async def authorize(request: Request) -> None:
    """A dependency: the caller's key, from X-API-Key (or the Bearer form where allowed)."""
    refusal = key_refusal(request, request.app.state.service.settings)
    if refusal is not None:
        raise ApiError(401, refusal, code="invalid_api_key")


def key_refusal(
    connection: HTTPConnection, settings: Settings, offered: str | None = None
) -> str | None:
    """Why `connection` may not use the API (no or a wrong key), or None when it may.

    `offered` is a key the caller sent another way: a WebSocket's Sec-WebSocket-Protocol
    value, since browsers cannot set headers on a WebSocket.
    """
    if settings.higgs_api_key is None:
        return None
    bearer = bearer_allowed(settings)
    given = connection.headers.get("x-api-key")
    if given is None and bearer:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    expected = settings.higgs_api_key.get_secret_value().encode()
    if any(
        key is not None and hmac.compare_digest(key.encode(), expected) for key in (given, offered)
    ):
        return None
    how = "'X-API-Key: <HIGGS_API_KEY>'"
    if bearer:
        how += " or 'Authorization: Bearer <HIGGS_API_KEY>'"
    if isinstance(connection, WebSocket):
        how += " or the key as the WebSocket subprotocol"
    return f"missing or wrong API key: send {how}"


def require_json(request: Request) -> None:
    """A dependency for routes that read JSON: anything else is refused before it is read.

    A missing type is refused too: browsers send text/plain, form and multipart bodies (and
    bodies without a type) to other origins without asking first; application/json they do not.
    """
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    got = repr(media_type[:60]) if media_type else "none"
    raise ApiError(
        415,
        f"Content-Type must be application/json (got {got})",
        code="unsupported_media_type",
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body: at most `limit` bytes, all of it within `timeout_s`."""
    too_large = ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout_s:g} s (HTTP_BODY_TIMEOUT_S)",
            code="body_timeout",
        ) from None
    except ClientDisconnect:
        raise ClientGone from None
    return bytes(body)


async def read_json(request: Request, limit: int, timeout_s: float) -> Any:
    """The body as JSON, read as `read_body` reads it."""
    body = await read_body(request, limit, timeout_s)
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply to be JSON we accept") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "request body must be a JSON object") from None


CLOSE = (b"connection", b"close")


class CloseUnread:
    """ASGI middleware: an answer that leaves before the request body ended (401, 408, 413,
    415, 429, a route that ignores bodies) says `Connection: close`, so uvicorn closes the
    socket instead of reading what is left of the body for ever."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        unread = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers

        async def tracked_receive() -> Message:
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and unread:
                message = {**message, "headers": [*message.get("headers", []), CLOSE]}
            await send(message)

        await self.app(scope, tracked_receive, closing_send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    The clock starts when the connection opens and again when a response ends; a request
    whose headers have not all arrived by then has its connection closed. (uvicorn's own
    keep-alive timer restarts on every byte, so it never fires on a slow drip.)
    """

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers(after=None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing():
            self._await_headers(after=finished)

    def handle_websocket_upgrade(self, event: Any) -> None:
        """A WebSocket has its own bounds (WS_IDLE_TIMEOUT_S, pings): no header deadline."""
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().handle_websocket_upgrade(event)

    def _await_headers(self, after: object) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire, after)

    def _expire(self, after: object) -> None:
        if self.cycle is after and not self.transport.is_closing():  # no new request began
            self.transport.close()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, telling the client why before it closes with 1009.

    A message over `ws_max_size` (HTTP_MAX_BODY_BYTES) is refused by the frame parser from
    its header's length, before its payload is kept, and the connection fails at once: the
    app never sees the message. The client first gets the error the speech WebSocket sends
    for every failure (`{"type": "error", "message"}`, speech_ws.py), then the close.
    """

    def handle_parser_exception(self) -> None:
        if isinstance(self.conn.parser_exc, PayloadTooBig) and self.handshake_complete:
            limit = self.config.ws_max_size
            message = (
                f"a message is larger than {limit} bytes, the limit (HTTP_MAX_BODY_BYTES): "
                'send text in smaller {"text"} messages'
            )
            error = json.dumps({"type": "error", "message": message}).encode()
            # The close frame is waiting in `conn`'s output: this frame goes out before it.
            self.transport.write(Frame(Opcode.TEXT, error).serialize(mask=False))
        super().handle_parser_exception()


def uvicorn_config(app: ASGIApp, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """The server's socket bounds from settings (the CLI and the tests start it this way)."""
    protocol = partial(GuardedH11Protocol, header_timeout_s=settings.http_header_timeout_s)
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,  # type: ignore[arg-type]
        ws=GuardedWebSocketProtocol,
        # uvicorn counts the connection asking too: +1 serves exactly HTTP_MAX_CONNECTIONS.
        limit_concurrency=settings.http_max_connections + 1,
        # Typed int, but uvicorn hands it to loop.call_later: fractions of a second work.
        timeout_keep_alive=settings.http_keep_alive_s,  # type: ignore[arg-type]
        # A WebSocket config may carry a reference clip; audio does not compress.
        ws_max_size=settings.http_max_body_bytes,
        ws_per_message_deflate=False,
        log_level="info",
        access_log=False,
    )


def listen_refusal(settings: Settings, host: str) -> str | None:
    """Why the server must not start on `host` (off loopback without a key), or None."""
    if settings.higgs_api_key is not None or settings.http_allow_no_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"HIGGS_API_KEY is not set and the server would listen on {host}, beyond loopback: "
        "set HIGGS_API_KEY (callers send it as X-API-Key), listen on 127.0.0.1, or set "
        "HTTP_ALLOW_NO_KEY=true to serve without a key on purpose (e.g. behind RunPod's "
        "gateway, which checks the RunPod key)"
    )
