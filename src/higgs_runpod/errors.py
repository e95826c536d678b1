"""Every error type the worker raises, and what each front needs to show it.

An error's class says how every front shows it, so that no front decides on its own:

    str(error)      the message: RunPod's `{"error": ...}` shows it as is (its caller owns
                    the endpoint, so a path in a start-up error is theirs to see)
    http_status     the HTTP front's status (and the WebSocket's close code, from it)
    openai_type     OpenAI's error `type`; `openai_code` its `code`, `param` its `param`
    public          whether an HTTP or WebSocket caller, who may be anyone holding a key,
                    reads the message; otherwise they read a short internal message and
                    the detail goes to the log only
    retry_after_s   a `Retry-After` header: the same request may succeed shortly

`RequestError` is the caller's fault: its message names the field and the limit. Anything
that is not a `HiggsRunpodError` is a bug of ours: the caller gets a short message and the
log the traceback. Each front has one small function that turns any error into its wire
shape: `fronts.runpod.job_error`, `fronts.http_errors.error_response` and
`fronts.speech_ws.close_reason`.

Two error classes live elsewhere on purpose: the container subpackage (bootstrap's
BootstrapError, volume_lock's LockTimeout) runs in the thin image's bare interpreter and
imports nothing outside itself and the standard library.
"""

from __future__ import annotations

import re
import sys

# A URL's user:password@, and the values in its query string (tokens, signatures).
_USERINFO = re.compile(r"(?<=://)[^/\s@?#]+@")
_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&\s#]+)=[^&\s#'\":,;)]*")

OUT_OF_MEMORY = (
    "the GPU ran out of memory for this request; try a shorter text, a shorter reference "
    "clip or a smaller max_new_tokens"
)


def mask_url_secrets(text: str) -> str:
    """`text` with every URL's credentials masked (`https://***@host/?token=***`), for
    messages and logs that name a configured URL such as HF_ENDPOINT."""
    return _QUERY_VALUE.sub(r"\1=***", _USERINFO.sub("***@", text))


class HiggsRunpodError(Exception):
    """Base class: every error this package raises on purpose (see the module docstring)."""

    http_status: int = 500
    openai_type: str = "server_error"
    openai_code: str | None = None
    param: str | None = None
    public: bool = False
    retry_after_s: int | None = None


def known_error(error: BaseException) -> HiggsRunpodError | None:
    """`error` as one of ours, or None for a bug: torch's own out-of-memory error (raised
    outside the engine's decode loop, which maps its own) counts as `OutOfMemoryError`.

    torch is looked up among the loaded modules rather than imported: if it is not loaded,
    no torch error can have been raised.
    """
    if isinstance(error, HiggsRunpodError):
        return error
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return OutOfMemoryError(OUT_OF_MEMORY)
    return None


# -- the caller's fault -----------------------------------------------------------------


class RequestError(HiggsRunpodError):
    """The request is invalid; `field` names the offending input field."""

    http_status = 400
    openai_type = "invalid_request_error"
    public = True

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        self.param = field or None
        super().__init__(f"{field}: {message}" if field else message)


class VoiceExistsError(RequestError):
    """The name is taken and the caller did not ask to overwrite it."""

    http_status = 409
    openai_code = "voice_exists"


class VoiceNotFoundError(RequestError):
    """No library voice has that name."""

    http_status = 404
    openai_code = "voice_not_found"


class TakeNotFoundError(RequestError):
    """No remembered take has that id (unknown, expired, or kept already)."""

    http_status = 404
    openai_code = "take_not_found"


class VoiceLimitError(RequestError):
    """The library holds MAX_VOICES voices already."""

    http_status = 409
    openai_code = "voice_limit"


class SessionError(RequestError):
    """A WebSocket session broke its protocol or a limit; its message says which."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


class ApiError(HiggsRunpodError):
    """An HTTP refusal before any work (key, content type, body, busy): its status, type
    and code are the instance's own."""

    public = True

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status, self.openai_type, self.param, self.openai_code = (
            status, type, param, code
        )  # fmt: skip


class ClientGone(HiggsRunpodError):
    """The client disconnected before its answer (while sending, before the first audio, or
    from a WebSocket session): nothing is sent back; 499 is nginx's code for the log."""

    http_status = 499


# -- ours, while serving: the worker keeps serving after each ---------------------------


class GenerationCancelled(HiggsRunpodError):
    """The caller went away (an HTTP client disconnected), so generation stopped early."""


class RequestTimeout(HiggsRunpodError):
    """The request ran past REQUEST_TIMEOUT_S and was stopped; the worker keeps serving."""

    http_status = 504
    openai_code = "timeout"
    public = True

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request took longer than {timeout_s:g} s (REQUEST_TIMEOUT_S) and was stopped"
        )


class OutOfMemoryError(HiggsRunpodError):
    """The device ran out of memory for this request; the worker keeps serving.

    HTTP 503 with Retry-After: memory is freed at once, and the requests that held it end
    within seconds, so the same request may well fit then.
    """

    http_status = 503
    public = True
    retry_after_s = 5


class DeliveryError(HiggsRunpodError):
    """The audio was made but could not be handed over (upload failed, too big to inline).

    The message is safe for the caller: it names the bucket and what to fix, never a
    credential or a signed URL.
    """

    public = True


class AudioDecodeError(HiggsRunpodError, ValueError):
    """The bytes are not audio that FFmpeg can decode (voices.py names the field)."""


# -- ours, at start-up: the worker cannot start -----------------------------------------


class ModelNotFoundError(HiggsRunpodError):
    """A checkpoint directory is missing or not a Higgs Audio v2 checkpoint."""


class CheckpointDownloadError(ModelNotFoundError):
    """A checkpoint could not be fetched from the hub or did not verify; the worker can't start."""


class InsufficientSpaceError(CheckpointDownloadError):
    """The volume has too little free space for the checkpoint."""


# -- the tools, on the caller's side ----------------------------------------------------


class DeployError(HiggsRunpodError):
    """The deploy config is wrong or RunPod refused a request; the message says which."""


class ClientError(HiggsRunpodError):
    """The endpoint could not be reached or refused the call (bad key, no such endpoint)."""


class JobFailed(HiggsRunpodError):
    """The job ended without audio: FAILED, CANCELLED, TIMED_OUT, or the wait ran out."""

    def __init__(self, job_id: str, status: str, message: str) -> None:
        self.job_id = job_id
        self.status = status
        self.message = message
        super().__init__(f"job {job_id} {status}: {message}")
