"""A worker's voice library from outside: the `voice.*` actions of a queue endpoint, or the
`/v1/audio/voices` routes of an HTTP server; both answer with the same voice objects."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from higgs_runpod.errors import ClientError, JobFailed
from higgs_runpod.tools.client import Endpoint


class Voices:
    """The voice library of a queue endpoint (the `voice.*` actions) or of an HTTP server
    (`/v1/audio/voices`); both answer with the same voice objects."""

    def __init__(
        self,
        *,
        endpoint: Endpoint | None = None,
        http_url: str | None = None,
        http_key: str | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        if (endpoint is None) == (http_url is None):
            raise ClientError("give either a queue endpoint or an HTTP server URL")
        self.endpoint = endpoint
        self.http_url = http_url.rstrip("/") + "/v1/audio/voices" if http_url else None
        headers = {"X-API-Key": http_key} if http_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def __enter__(self) -> Voices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str, clip: bytes, transcript: str, **fields: Any) -> dict[str, Any]:
        """Create a voice; `fields`: description, consent, overwrite."""
        given = {key: value for key, value in fields.items() if value is not None}
        if self.endpoint is not None:
            audio = base64.b64encode(clip).decode("ascii")
            return self._action("voice.create", name=name, transcript=transcript,
                                audio_base64=audio, **given)  # fmt: skip
        form = {"name": name, "transcript": transcript, **{k: str(v) for k, v in given.items()}}
        return self._answer(
            self._http.post(self._url(), data=form, files={"audio": ("clip", clip)})
        )

    def keep(self, name: str, take_id: str, **fields: Any) -> dict[str, Any]:
        """Keep a remembered take (a speech response's take_id) as a voice, exactly;
        `fields`: transcript, description, consent, overwrite."""
        given = {key: value for key, value in fields.items() if value is not None}
        if self.endpoint is not None:
            return self._action("voice.create", name=name, take_id=take_id, **given)
        body = {"name": name, "take_id": take_id, **given}
        return self._answer(self._http.post(self._url(), json=body))

    def list(self) -> list[dict[str, Any]]:
        """The library's voices (an HTTP server lists OpenAI's names after them)."""
        if self.endpoint is not None:
            return self._action("voice.list")["voices"]
        return self._answer(self._http.get(self._url()))["voices"]

    def get(self, name: str) -> dict[str, Any]:
        if self.endpoint is not None:
            return self._action("voice.get", name=name)
        return self._answer(self._http.get(self._url(name)))

    def remove(self, name: str) -> None:
        if self.endpoint is not None:
            self._action("voice.delete", name=name)
            return
        self._answer(self._http.delete(self._url(name)))

    def _url(self, name: str | None = None) -> str:
        assert self.http_url is not None
        return self.http_url if name is None else f"{self.http_url}/{name}"

    def _action(self, action: str, **fields: Any) -> dict[str, Any]:
        assert self.endpoint is not None
        try:
            output = self.endpoint.run({"action": action, **fields})
        except JobFailed as error:  # the worker's refusal (a conflict, an unknown name)
            raise ClientError(error.message) from None
        if "error" in output:
            raise ClientError(str(output["error"]))
        return output

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        if response.status_code == 204:
            return None
        if response.is_success:
            return response.json()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise ClientError(f"HTTP {response.status_code}: {message}")
