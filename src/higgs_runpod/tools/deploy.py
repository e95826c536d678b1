"""`higgs-runpod deploy`: create or update the RunPod template and endpoint from a JSON file.

Everything goes through RunPod's REST API v2 (`/v2/templates`, `/v2/serverless`,
`/v2/network-volumes`). Objects are found by name, so running it again changes only what
differs, and nothing at all when nothing does. `--dry-run` swaps the HTTP client for one
that prints each request as a JSON line and sends nothing; the plan is then the one for an
account where nothing exists yet. The API key only ever travels in the Authorization
header, and every message printed is scrubbed of it in case the server echoes it back.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from higgs_runpod.errors import DeployError

SECRET_NAME_PARTS = {"KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIALS"}
SECRET_REFERENCE = re.compile(r"^\{\{\s*RUNPOD_SECRET_[A-Za-z0-9_.-]+\s*\}\}$")
PLACEHOLDER_OWNER = "OWNER"


# -- the config file -------------------------------------------------------------------


def load_config(path: Path, image: str | None = None) -> dict[str, Any]:
    """Read and check `deploy/endpoint.json`; `image` overrides the template's image."""
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise DeployError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise DeployError(f"{path} is not valid JSON: {exc}") from None
    for section in ("template", "endpoint"):
        if not isinstance(config.get(section), dict) or not config[section].get("name"):
            raise DeployError(f"{path}: `{section}` must be an object with a `name`")
    template = config["template"]
    if image:
        template["image"] = image
    if not template.get("image") or f"/{PLACEHOLDER_OWNER}/" in template["image"]:
        raise DeployError(
            f"{path}: template.image must name your image, e.g. "
            "ghcr.io/<your-github-user>/<repo>:latest (or pass --image)"
        )
    template["env"] = {k: str(v) for k, v in template.get("env", {}).items() if v != ""}
    for name, value in template["env"].items():
        parts = set(name.upper().split("_"))
        if parts & SECRET_NAME_PARTS and not SECRET_REFERENCE.match(value):
            raise DeployError(
                f"{path}: template.env.{name} looks secret; give it as a RunPod secret "
                f"reference such as {{{{ RUNPOD_SECRET_{name.lower()} }}}}, never the value"
            )
    volume = config.get("networkVolume")
    if volume is not None and not (isinstance(volume, dict) and volume.get("name")):
        raise DeployError(f"{path}: `networkVolume` must be an object with a `name`")
    return config


# -- talking to RunPod -------------------------------------------------------------------

Api = Callable[[str, str, dict[str, Any] | None], dict[str, Any]]


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def http_api(base_url: str, api_key: str, timeout_s: float = 30.0) -> Api:
    """Send requests to RunPod; raise `DeployError` with RunPod's own message on failure."""
    client = httpx.Client(
        base_url=base_url.rstrip("/"),
        headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"},
        timeout=timeout_s,
    )

    def call(method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            response = client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise DeployError(
                redact(f"cannot reach RunPod at {base_url} ({type(exc).__name__}: {exc})", api_key)
            ) from None
        if response.is_error:
            raise DeployError(
                redact(f"{method} {path}: {_error_message(response)}", api_key)
            ) from None
        try:
            return response.json() if response.content else {}
        except ValueError:
            raise DeployError(f"{method} {path}: RunPod's answer is not JSON") from None

    return call


def _error_message(response: httpx.Response) -> str:
    """RunPod's problem+json (title, detail, errors), or the start of whatever came back."""
    status = f"HTTP {response.status_code}"
    try:
        problem = response.json()
    except ValueError:
        return f"{status}: {response.text[:300]}"
    if not isinstance(problem, dict):
        return f"{status}: {str(problem)[:300]}"
    text = f"{status} {problem.get('title', '')}".strip()
    if problem.get("detail"):
        text += f": {problem['detail']}"
    if problem.get("errors"):
        text += " (" + "; ".join(map(str, problem["errors"])) + ")"
    return text


def dry_run_api(base_url: str, out: TextIO) -> Api:
    """Print each request as one JSON line and answer as if the account were empty."""

    def call(method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = base_url.rstrip("/") + path
        out.write(json.dumps({"method": method, "url": url, "body": body}) + "\n")
        if method == "GET":
            key = {"/v2/templates": "templates", "/v2/serverless": "endpoints"}
            return {key.get(path, "networkVolumes"): []}
        kind = {"/v2/templates": "template", "/v2/serverless": "endpoint"}.get(path, "volume")
        return {**(body or {}), "id": f"<{kind} id>"}

    return call


# -- create or update ----------------------------------------------------------------------


@dataclass
class Outcome:
    endpoint: dict[str, Any]
    actions: list[str]


def _changes(desired: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any]:
    """The desired fields whose value differs; nested objects compare only the keys we set."""
    changed = {}
    for key, value in desired.items():
        current = existing.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            same = all(current.get(k) == v for k, v in value.items())
        elif key in ("networkVolumes", "dataCenterIds") and isinstance(current, list):
            same = sorted(current) == sorted(value)
        else:
            same = current == value
        if not same:
            changed[key] = value
    return changed


def _find(items: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any] | None:
    found = [item for item in items if item.get("name") == name]
    if len(found) > 1:
        raise DeployError(f"{len(found)} {kind}s are named {name!r}; rename or delete all but one")
    return found[0] if found else None


def _upsert(
    api: Api,
    route: str,
    listing: str,
    desired: dict[str, Any],
    kind: str,
    actions: list[str],
    known: Callable[[dict], dict] = lambda _: {},
) -> dict[str, Any]:
    """Create `desired` unless one of that name exists; else PATCH only what differs.

    `known(existing)` may supply fields that RunPod does not return but that are known
    to match (an endpoint's listing has its template's image, not the template's id)."""
    existing = _find(api("GET", route, None).get(listing, []), desired["name"], kind)
    if existing is None:
        created = api("POST", route, desired)
        actions.append(f"created {kind} {desired['name']!r} ({created.get('id')})")
        return created
    changes = _changes(desired, {**known(existing), **existing})
    if "type" in changes:
        raise DeployError(
            f"{kind} {desired['name']!r} exists with type {existing.get('type')}; RunPod cannot "
            f"change that: delete it or choose another name"
        )
    if not changes:
        actions.append(f"{kind} {desired['name']!r} ({existing['id']}) unchanged")
        return existing
    updated = api("PATCH", f"{route}/{existing['id']}", changes)
    actions.append(f"updated {kind} {desired['name']!r} ({existing['id']}): {', '.join(changes)}")
    return updated


def _network_volume(api: Api, wanted: dict[str, Any], actions: list[str]) -> dict[str, Any]:
    """Find the volume by name, or create it (RunPod cannot resize it down, so no update)."""
    listing = api("GET", "/v2/network-volumes", None).get("networkVolumes", [])
    existing = _find(listing, wanted["name"], "network volume")
    if existing is not None:
        actions.append(f"network volume {wanted['name']!r} ({existing['id']}) found")
        return existing
    created = api("POST", "/v2/network-volumes", wanted)
    actions.append(f"created network volume {wanted['name']!r} ({created.get('id')})")
    return created


def deploy(config: dict[str, Any], api: Api) -> Outcome:
    """Create or update the network volume (optional), the template, then the endpoint."""
    actions: list[str] = []
    endpoint = dict(config["endpoint"])
    if config.get("networkVolume"):
        volume = _network_volume(api, config["networkVolume"], actions)
        endpoint["networkVolumes"] = [volume["id"]]
        endpoint["dataCenterIds"] = [volume["dataCenter"]]
    template = {"category": "NVIDIA", "serverless": True, **config["template"]}
    template_id = _upsert(api, "/v2/templates", "templates", template, "template", actions)["id"]
    endpoint = {"type": "QUEUE", **endpoint, "templateId": template_id}

    def known(existing: dict[str, Any]) -> dict[str, Any]:
        same_image = existing.get("image") == template["image"]
        return {"templateId": template_id} if same_image else {}

    result = _upsert(api, "/v2/serverless", "endpoints", endpoint, "endpoint", actions, known)
    return Outcome(endpoint=result, actions=actions)


def request_urls(endpoint: dict[str, Any]) -> dict[str, str]:
    """The URLs to call, from RunPod's answer (or built from the id when it has none)."""
    urls = endpoint.get("requestUrls") or {}
    base = f"https://api.runpod.ai/v2/{endpoint.get('id')}"
    return {
        "runsync": urls.get("runSync", f"{base}/runsync"),
        "run": urls.get("run", f"{base}/run"),
        "status": urls.get("status", f"{base}/status/{{job_id}}"),
        "health": urls.get("health", f"{base}/health"),
    }


def run(
    config_path: Path,
    *,
    api_key: str | None,
    api_url: str,
    dry_run: bool,
    image: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The command: exit code 0 on success, 1 with one clear message on failure."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load_config(config_path, image)
        if dry_run:
            api = dry_run_api(api_url, out)
        elif not api_key:
            raise DeployError("RUNPOD_API_KEY is not set (create a key in RunPod's console)")
        else:
            api = http_api(api_url, api_key)
        outcome = deploy(config, api)
    except DeployError as exc:
        err.write(redact(f"error: {exc}\n", api_key))
        return 1
    report = out if not dry_run else err  # a dry run keeps stdout for the JSON lines
    for action in outcome.actions:
        report.write(redact(f"{action}\n", api_key))
    if not dry_run:
        out.write(f"endpoint id: {outcome.endpoint.get('id')}\n")
        for name, url in request_urls(outcome.endpoint).items():
            out.write(f"  {name}: {url}\n")
    return 0
