"""Call a deployed worker: submit a job, follow it to the end, save the audio.

    Endpoint.run(input) --POST /run--> job id --/status/{id}, bounded, with backoff-->
          output --save_audio--> file (inline base64, or downloaded from audio_url)

One client for both ends: RunPod's cloud API (`https://api.runpod.ai/v2/<id>`, GET
`/status/{id}`, POST `/cancel/{id}`) and `higgs-runpod serve` (RunPod's local API server,
where POST `/status/{id}` runs the job and answers when it is done). The first status call
tells them apart: the local server answers GET with 405, so the client switches to POST.

Ctrl-C while waiting cancels the job, so an abandoned request does not keep a GPU busy;
so does running out of the wait budget. The RunPod API key goes in the Authorization header
of https calls to RunPod's API hosts and nowhere else (`key_goes_to`): a local `serve` needs
none, and any other URL could be anyone's. Presigned URLs are downloaded, never printed.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from higgs_runpod.errors import ClientError, HiggsRunpodError, JobFailed
from higgs_runpod.settings import load_client_settings

CLOUD_API = "https://api.runpod.ai/v2"
# Where a RunPod API key may go: the job API, and load-balancing endpoints (ID.api.runpod.ai).
RUNPOD_API_HOSTS = ("api.runpod.ai", "api.runpod.io")
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_QUEUE_CHECK_S = 10.0


@dataclass(frozen=True)
class JobUpdate:
    """What the client knows about a running job, passed to `on_update` at each poll."""

    job_id: str
    status: str
    elapsed_s: float
    progress: Any = None  # what the worker sent with progress_update, if anything
    queued: int | None = None  # jobs waiting on the endpoint (cloud /health), if known


class Endpoint:
    """One endpoint's job API; `run` submits a job and waits for its output."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        max_wait_s: float = 900.0,
        poll_s: float = 0.5,
        max_poll_s: float = 5.0,
        request_timeout_s: float = 30.0,
        send_key_to_any_host: bool = False,
    ) -> None:
        """`send_key_to_any_host` sends `api_key` to `url` even when it is not RunPod's API
        (your own gateway in front of it); by default only `key_goes_to` hosts get it."""
        self.url = url.rstrip("/")
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.request_timeout_s = request_timeout_s
        self.sends_key = bool(api_key) and (send_key_to_any_host or key_goes_to(self.url))
        headers = {"Authorization": f"Bearer {api_key}"} if self.sends_key else {}
        self._http = httpx.Client(headers=headers, timeout=request_timeout_s)
        self._status_method = "GET"  # becomes POST against RunPod's local API server

    @classmethod
    def from_id(cls, endpoint_id: str, api_key: str | None = None, **options: Any) -> Endpoint:
        """A RunPod cloud endpoint by id; the key defaults to RUNPOD_API_KEY."""
        api_key = api_key or load_client_settings().runpod_key
        return cls(f"{CLOUD_API}/{endpoint_id}", api_key, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        job_input: dict[str, Any],
        *,
        s3_config: dict[str, str] | None = None,
        on_update: Callable[[JobUpdate], None] | None = None,
    ) -> dict[str, Any]:
        """Submit, wait, return the job's output; cancel the job on Ctrl-C or when the wait ends."""
        job_id = self.submit(job_input, s3_config=s3_config)
        try:
            return self.wait(job_id, on_update=on_update)
        except KeyboardInterrupt:
            self.cancel(job_id)
            raise

    def submit(self, job_input: dict[str, Any], *, s3_config: dict[str, str] | None = None) -> str:
        """POST /run; the job id. `s3Config` rides beside `input`, as RunPod expects."""
        body: dict[str, Any] = {"input": job_input}
        if s3_config is not None:
            body["s3Config"] = s3_config
        deadline = time.monotonic() + self.max_wait_s
        job = self._call("POST", "/run", deadline, json=body, idempotent=False).json()
        if not isinstance(job, dict) or "id" not in job:
            raise ClientError(f"/run answered without a job id: {str(job)[:200]}")
        return str(job["id"])

    def wait(
        self, job_id: str, *, on_update: Callable[[JobUpdate], None] | None = None
    ) -> dict[str, Any]:
        """Poll until the job ends (backoff up to `max_poll_s`); its output, or `JobFailed`."""
        started = time.monotonic()
        deadline = started + self.max_wait_s
        delay = self.poll_s
        queue_checked = 0.0
        while True:
            job = self.status(job_id, deadline)
            status = str(job.get("status", "UNKNOWN"))
            queued = None
            if status == "IN_QUEUE" and time.monotonic() - queue_checked > _QUEUE_CHECK_S:
                queue_checked = time.monotonic()
                queued = self._queued(deadline)
            if on_update is not None:
                progress = job.get("output") if status == "IN_PROGRESS" else None
                on_update(JobUpdate(job_id, status, time.monotonic() - started, progress, queued))
            if status == "COMPLETED":
                return _one_output(job_id, job.get("output"))
            if status in TERMINAL:
                raise JobFailed(job_id, status, _failure_message(job))
            if time.monotonic() + delay > deadline:
                outcome = "was cancelled" if self.cancel(job_id) else "could not be cancelled"
                raise JobFailed(
                    job_id, "CLIENT_TIMEOUT",
                    f"still {status} after {self.max_wait_s:.0f} s; the job {outcome} "
                    "(wait longer with --max-wait / max_wait_s)",
                )  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 1.5, self.max_poll_s)

    def status(self, job_id: str, deadline: float) -> dict[str, Any]:
        """One status call; against the local server, POST runs the job and may take long."""
        path = f"/status/{job_id}"
        # A POST that timed out would be retried, and the local server would run the job
        # again: give it all the time that is left instead.
        timeout = _remaining(deadline) if self._status_method == "POST" else None
        response = self._call(self._status_method, path, deadline, allow={405}, timeout=timeout)
        if response.status_code == 405 and self._status_method == "GET":
            self._status_method = "POST"
            response = self._call("POST", path, deadline, timeout=_remaining(deadline))
        if response.status_code == 405:
            raise ClientError(f"{self.url} does not speak RunPod's job API (405 on {path})")
        return response.json()

    def cancel(self, job_id: str) -> bool:
        """POST /cancel/{id}, best effort (the local server has no /cancel): True if accepted."""
        try:
            response = self._http.post(f"{self.url}/cancel/{job_id}", timeout=10.0)
        except httpx.HTTPError:
            return False
        return response.is_success

    def _queued(self, deadline: float) -> int | None:
        """Jobs waiting on the endpoint (RunPod gives no per-job position); None if unknown."""
        try:
            health = self._call("GET", "/health", deadline, allow={404, 405}).json()
            return int(health["jobs"]["inQueue"])
        except (HiggsRunpodError, ValueError, KeyError, TypeError):
            return None

    def _call(
        self,
        method: str,
        path: str,
        deadline: float,
        *,
        json: Any = None,
        idempotent: bool = True,
        allow: frozenset[int] | set[int] = frozenset(),
        timeout: float | None = None,
    ) -> httpx.Response:
        """One API call, retried on 429 (Retry-After honoured) and, if idempotent, on 5xx."""
        delay = self.poll_s
        while True:
            try:
                response = self._http.request(
                    method, self.url + path, json=json, timeout=timeout or self.request_timeout_s
                )
            except httpx.TransportError as error:
                # A refused connection never reached the server: safe to retry even /run.
                retry = idempotent or isinstance(error, httpx.ConnectError)
                pause = delay
                problem = f"cannot reach {self.url} ({type(error).__name__})"
            else:
                if response.is_success or response.status_code in allow:
                    return response
                retry = response.status_code == 429 or (
                    idempotent and response.status_code in _RETRY_STATUSES
                )
                pause = _retry_after(response) or delay
                problem = _http_error(response, path)
            if not retry or time.monotonic() + pause > deadline:
                raise ClientError(problem)
            time.sleep(pause)
            delay = min(delay * 2, self.max_poll_s)


def key_goes_to(url: str) -> bool:
    """Whether a RunPod API key may be sent to `url`: https to one of RunPod's API hosts."""
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    host = parts.host.lower()
    return parts.scheme == "https" and any(
        host == api or host.endswith("." + api) for api in RUNPOD_API_HOSTS
    )


def save_audio(output: dict[str, Any], path: str | Path, *, timeout_s: float = 300.0) -> int:
    """Write a job's audio to `path` (inline base64, or downloaded from `audio_url`); bytes."""
    path = Path(path)
    partial = path.with_name(path.name + ".part")
    try:
        if output.get("audio_base64") is not None:
            size = partial.write_bytes(base64.b64decode(output["audio_base64"]))
        elif output.get("audio_url"):
            size = _download(output["audio_url"], partial, output.get("s3_uri"), timeout_s)
        else:
            raise ClientError("the job's output has neither audio_base64 nor audio_url")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return size


def _download(url: str, target: Path, name: str | None, timeout_s: float) -> int:
    """Stream a presigned URL to `target`; errors name the object, never the signed URL."""
    what = name or "the audio"
    size = 0
    try:
        with httpx.stream("GET", url, timeout=timeout_s) as response, target.open("wb") as file:
            if not response.is_success:
                raise ClientError(
                    f"downloading {what} failed: HTTP {response.status_code} "
                    "(the presigned URL may have expired)"
                )
            for chunk in response.iter_bytes():
                size += file.write(chunk)
    except httpx.HTTPError as error:
        raise ClientError(f"downloading {what} failed ({type(error).__name__})") from None
    return size


def speak(
    job_input: dict[str, Any],
    path: str | Path,
    *,
    url: str | None = None,
    endpoint_id: str | None = None,
    api_key: str | None = None,
    s3_config: dict[str, str] | None = None,
    on_update: Callable[[JobUpdate], None] | None = None,
    max_wait_s: float = 900.0,
) -> dict[str, Any]:
    """Run one job on `url` or `endpoint_id` and write its audio to `path`; the output."""
    api_key = api_key or load_client_settings().runpod_key
    if url:
        endpoint = Endpoint(url, api_key, max_wait_s=max_wait_s)
    elif endpoint_id:
        endpoint = Endpoint.from_id(endpoint_id, api_key, max_wait_s=max_wait_s)
    else:
        raise ClientError("give an endpoint id or a base URL")
    with endpoint:
        output = endpoint.run(job_input, s3_config=s3_config, on_update=on_update)
    save_audio(output, path)
    return output


def _one_output(job_id: str, output: Any) -> dict[str, Any]:
    """The job's output as one object, whatever handler the endpoint runs.

    A streaming endpoint (ENABLE_STREAMING) returns a list: one response object for a
    plain job, or audio pieces then a summary for a `stream: true` job; the pieces of a
    stream are joined here into one file.
    """
    if isinstance(output, dict):
        return output
    if not isinstance(output, list) or not output or not isinstance(output[-1], dict):
        raise JobFailed(job_id, "COMPLETED", f"unexpected output: {str(output)[:200]}")
    if "error" in output[-1]:
        raise JobFailed(job_id, "FAILED", str(output[-1]["error"]))
    if len(output) == 1:
        return output[0]
    *pieces, summary = output
    audio = b"".join(base64.b64decode(piece["audio_base64"]) for piece in pieces)
    return {**summary, "audio_base64": base64.b64encode(audio).decode("ascii")}


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 1.0)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(float(response.headers.get("Retry-After", "")), 0.0)
    except ValueError:
        return None


def _http_error(response: httpx.Response, path: str) -> str:
    if response.status_code == 401:
        return f"HTTP 401 on {path}: the endpoint refused the API key (check RUNPOD_API_KEY)"
    if response.status_code == 404:
        return f"HTTP 404 on {path}: no such endpoint or job (check the endpoint id or URL)"
    return f"HTTP {response.status_code} on {path}: {response.text[:200]}"


def _failure_message(job: dict[str, Any]) -> str:
    if job.get("error"):
        return str(job["error"])
    return {
        "TIMED_OUT": "the job ran past the endpoint's execution timeout",
        "CANCELLED": "the job was cancelled",
    }.get(str(job.get("status")), "the job failed without a message")
