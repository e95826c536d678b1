"""The error types the worker raises, and the one place they become a caller's message.

`RequestError` is the caller's fault: its message names the field and the limit and goes
to the caller as is. Everything else is ours: the caller gets a short message and the
detail goes to the log only (no traceback, no secret, no signed URL in a job's output).
"""

from __future__ import annotations

import re

# A URL's user:password@, and the values in its query string (tokens, signatures).
_USERINFO = re.compile(r"(?<=://)[^/\s@?#]+@")
_QUERY_VALUE = re.compile(r"(?<=[?&])([^=&\s#]+)=[^&\s#'\":,;)]*")


def mask_url_secrets(text: str) -> str:
    """`text` with every URL's credentials masked (`https://***@host/?token=***`), for
    messages and logs that name a configured URL such as HF_ENDPOINT."""
    return _QUERY_VALUE.sub(r"\1=***", _USERINFO.sub("***@", text))


class HiggsRunpodError(Exception):
    """Base class: every error this package raises on purpose."""


class RequestError(HiggsRunpodError):
    """The request is invalid; `field` names the offending input field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class ModelNotFoundError(HiggsRunpodError):
    """A checkpoint directory is missing or not a Higgs Audio v2 checkpoint."""


class GenerationCancelled(HiggsRunpodError):
    """The caller went away (an HTTP client disconnected), so generation stopped early."""


class RequestTimeout(HiggsRunpodError):
    """The request ran past REQUEST_TIMEOUT_S and was stopped; the worker keeps serving."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request took longer than {timeout_s:g} s (REQUEST_TIMEOUT_S) and was stopped"
        )


class OutOfMemoryError(HiggsRunpodError):
    """The device ran out of memory for this request; the worker keeps serving."""


class DeliveryError(HiggsRunpodError):
    """The audio was made but could not be handed over (upload failed, too big to inline).

    The message is safe for the caller: it names the bucket and what to fix, never a
    credential or a signed URL.
    """


class CheckpointDownloadError(ModelNotFoundError):
    """A checkpoint could not be fetched from the hub or did not verify; the worker can't start."""


class InsufficientSpaceError(CheckpointDownloadError):
    """The volume has too little free space for the checkpoint."""
