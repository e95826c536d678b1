"""Any error to the HTTP front's answer, in OpenAI's shape: the one place that does it.

    {"error": {"message", "type", "param", "code"}} with the error's own status (errors.py)

Out of memory is a 503 with `Retry-After`; a client that left gets an empty 499 (nobody
reads it; it is for the log and the metrics); a bug of ours is a 500 whose message says
only that, its traceback in the log.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from higgs_runpod.errors import ApiError, ClientGone, RequestTimeout, known_error

log = logging.getLogger(__name__)

INTERNAL = "internal error while generating speech; the worker log has the details"


def error_response(error: BaseException, path: str) -> Response:
    """The answer for `error` raised while serving `path` (which the log line names)."""
    if isinstance(error, StarletteHTTPException):  # Starlette's own: no route, wrong method
        error = ApiError(error.status_code, str(error.detail))
    known = known_error(error)
    if known is None:
        log.error("internal error on %s", path, exc_info=error)
        return _body(500, INTERNAL, "server_error")
    if isinstance(known, ClientGone):
        return Response(status_code=known.http_status)
    if isinstance(known, RequestTimeout):
        log.warning("request on %s stopped: %s", path, known)
    elif known.http_status >= 500:
        log.error("request on %s failed: %s", path, known)
    headers = {"Retry-After": str(known.retry_after_s)} if known.retry_after_s else None
    message = str(known) if known.public else INTERNAL
    return _body(
        known.http_status, message, known.openai_type, known.param, known.openai_code, headers
    )


async def handle(request: Request, error: Exception) -> Response:
    """The app's exception handler, for every exception (see `create_app`)."""
    return error_response(error, request.url.path)


def _body(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    error = {"message": message, "type": type, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)
