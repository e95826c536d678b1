"""`higgs-runpod deploy` against a stand-in for RunPod's REST API v2 on loopback.

RunPod's cloud cannot run here, so a small HTTP server plays it: it keeps templates,
endpoints and network volumes in memory and checks every request's method, path and
body against RunPod's own published schema (the subset in tests/data/runpod-v2-subset.json,
source named inside), and its own answers against the response schemas, so the client
is tested against the shapes the real API documents. The client itself is the real one:
the `higgs-runpod deploy` command in a subprocess, over real HTTP.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from copy import deepcopy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
SUBSET = json.loads((ROOT / "tests/data/runpod-v2-subset.json").read_text())
REGISTRY = Registry().with_resource(
    "urn:runpod-v2", Resource.from_contents(SUBSET, default_specification=DRAFT202012)
)
API_KEY = "rpa_TESTKEY1234567890abcdef"
IMAGE = "ghcr.io/someone/higgs-runpod:latest"


def validate(ref: str, instance: Any) -> list[str]:
    validator = Draft202012Validator({"$ref": f"urn:runpod-v2{ref}"}, registry=REGISTRY)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


def operation(method: str, path: str) -> tuple[str, dict] | None:
    for route, methods in SUBSET["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", route), path) and method in methods:
            return route, methods[method]
    return None


class FakeRunPod:
    """Templates, endpoints and volumes in memory, as the v2 API describes them."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.violations: list[str] = []
        self.fail_next: dict[tuple[str, str], tuple[int, dict]] = {}
        self.templates: dict[str, dict] = {}
        self.endpoints: dict[str, dict] = {}
        self.volumes: dict[str, dict] = {}
        self.counter = 0

    def new_id(self) -> str:
        self.counter += 1
        return f"id{self.counter:04d}"

    def endpoint_from(self, body: dict, template: dict, id_: str) -> dict:
        base = f"https://api.runpod.ai/v2/{id_}"
        urls = {
            "run": "/run", "runSync": "/runsync", "status": "/status/{job_id}",
            "stream": "/stream/{job_id}", "cancel": "/cancel/{job_id}",
            "retry": "/retry/{job_id}", "purgeQueue": "/purge-queue", "health": "/health",
        }  # fmt: skip
        return {
            "id": id_, "name": body["name"], "type": body["type"],
            "requestUrls": {k: base + v for k, v in urls.items()},
            "image": template["image"], "args": "", "disk": template["disk"], "ports": [],
            "env": template["env"], "registry": None,
            "gpu": {"allowedCudaVersions": [], "minCudaVersion": None, "count": 1,
                    **body.get("gpu", {})},
            "workers": {"min": 0, "max": 3, "idleTimeout": 10, **body.get("workers", {})},
            "scaling": body["scaling"], "dataCenterIds": body.get("dataCenterIds", []),
            "networkVolumes": body.get("networkVolumes", []),
            "timeout": body.get("timeout", 300000), "flashboot": body.get("flashboot", "OFF"),
            "createdAt": "2026-11-27T00:00:00Z",
        }  # fmt: skip

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        found = operation(method.lower(), path)
        if found is None:
            self.violations.append(f"{method} {path}: no such operation in RunPod's v2 API")
            return 404, {"title": "Not Found", "status": 404, "detail": "no route"}
        route, op = found
        if "requestBody" in op:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            errors = validate(ref, body)
            if errors:
                self.violations.append(f"{method} {path}: {errors}")
                return 422, {"title": "Unprocessable Entity", "status": 422,
                             "detail": "invalid body", "errors": errors}  # fmt: skip
        elif body is not None:
            self.violations.append(f"{method} {path}: a body where none is expected")
        if (method, path) in self.fail_next:
            return self.fail_next.pop((method, path))
        status, answer = self.answer(method, route, path, body)
        ref = op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
        self.violations.extend(f"fake server answer: {e}" for e in validate(ref, answer))
        return status, answer

    def answer(self, method: str, route: str, path: str, body: Any) -> tuple[int, Any]:
        id_ = path.rsplit("/", 1)[-1]
        if route == "/v2/network-volumes":
            if method == "GET":
                return 200, {"networkVolumes": list(self.volumes.values())}
            volume = {"type": "STANDARD", **body, "id": self.new_id()}
            self.volumes[volume["id"]] = volume
            return 201, volume
        if route.startswith("/v2/templates"):
            if method == "GET":
                return 200, {"templates": list(self.templates.values())}
            if method == "POST":
                template = {"args": "", "disk": 10, "mounts": {}, "ports": [], "env": {},
                            "registry": None, "public": False, "startSsh": True,
                            "startJupyter": False, "allowedCudaVersions": [],
                            **body, "id": self.new_id()}  # fmt: skip
                self.templates[template["id"]] = template
                return 201, template
            self.templates[id_].update(body)
            for endpoint in self.endpoints.values():  # RunPod rolls the endpoint out anew
                if endpoint["_template"] == id_:
                    endpoint.update(image=self.templates[id_]["image"])
            return 200, self.templates[id_]
        if method == "GET":
            listing = [
                {k: v for k, v in e.items() if k != "_template"} for e in self.endpoints.values()
            ]
            return 200, {"endpoints": listing}
        if method == "POST":
            id_ = self.new_id()
            endpoint = self.endpoint_from(body, self.templates[body["templateId"]], id_)
            self.endpoints[id_] = {**endpoint, "_template": body["templateId"]}
            return 201, endpoint
        endpoint = self.endpoints[id_]
        template_id = body.get("templateId", endpoint["_template"])
        merged = {**endpoint, **{k: v for k, v in body.items() if k != "templateId"}}
        endpoint.update(self.endpoint_from(merged, self.templates[template_id], id_))
        endpoint["_template"] = template_id
        return 200, {k: v for k, v in endpoint.items() if k != "_template"}


@pytest.fixture
def runpod() -> Iterator[tuple[FakeRunPod, str]]:
    fake = FakeRunPod()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                detail = f"invalid api key {self.headers.get('Authorization')}"
                status, answer = 401, {"title": "Unauthorized", "status": 401, "detail": detail}
            else:
                status, answer = fake.handle(
                    self.command, self.path, json.loads(raw) if raw else None
                )
            data = json.dumps(answer).encode()
            self.send_response(status)
            kind = "application/json" if status < 400 else "application/problem+json"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def write_config(tmp_path: Path, **changes: Any) -> Path:
    config = json.loads((ROOT / "deploy/endpoint.json").read_text())
    config["template"]["image"] = IMAGE
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "endpoint.json"
    path.write_text(json.dumps(config))
    return path


def deploy(
    url: str, config: Path, *extra: str, key: str | None = API_KEY
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "RUNPOD_API_URL": url}
    if key is not None:
        env["RUNPOD_API_KEY"] = key
    command = [
        sys.executable,
        "-m",
        "higgs_runpod.tools.cli",
        "deploy",
        "--config",
        str(config),
        *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert API_KEY not in done.stdout + done.stderr, "the API key must never be printed"
    return done


def writes(fake: FakeRunPod) -> list[tuple[str, str, Any]]:
    return [r for r in fake.requests if r[0] != "GET"]


def test_first_deploy_creates_volume_template_and_endpoint(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    done = deploy(url, write_config(tmp_path))
    assert done.returncode == 0, done.stderr
    assert fake.violations == []
    assert [(m, p) for m, p, _ in writes(fake)] == [
        ("POST", "/v2/network-volumes"), ("POST", "/v2/templates"), ("POST", "/v2/serverless"),
    ]  # fmt: skip
    endpoint = next(iter(fake.endpoints.values()))
    volume = next(iter(fake.volumes.values()))
    assert endpoint["networkVolumes"] == [volume["id"]]
    assert endpoint["dataCenterIds"] == [volume["dataCenter"]]
    assert endpoint["gpu"]["pools"][0] == "ADA_24"
    template = next(iter(fake.templates.values()))
    assert template["serverless"] is True and template["image"] == IMAGE
    assert "S3_BUCKET" not in template["env"], "empty values mean unset"
    assert template["env"]["AWS_SECRET_ACCESS_KEY"].startswith("{{ RUNPOD_SECRET_")
    assert f"endpoint id: {endpoint['id']}" in done.stdout
    assert f"https://api.runpod.ai/v2/{endpoint['id']}/runsync" in done.stdout


def test_second_deploy_changes_nothing(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    config = write_config(tmp_path)
    assert deploy(url, config).returncode == 0
    fake.requests.clear()
    done = deploy(url, config)
    assert done.returncode == 0, done.stderr
    assert writes(fake) == [], "a second run with the same config must send no change"
    assert "template 'higgs-audio-v2'" in done.stdout and "unchanged" in done.stdout
    assert fake.violations == []


def test_changed_config_patches_only_what_differs(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    assert deploy(url, write_config(tmp_path)).returncode == 0
    fake.requests.clear()
    new_image = "ghcr.io/someone/higgs-runpod:sha-abc1234"
    config = write_config(tmp_path, endpoint__workers={"min": 0, "max": 5, "idleTimeout": 60})
    done = deploy(url, config, "--image", new_image)
    assert done.returncode == 0, done.stderr
    (t_method, t_path, t_body), (e_method, e_path, e_body) = writes(fake)
    assert (t_method, t_path, t_body) == ("PATCH", t_path, {"image": new_image})
    assert t_path.startswith("/v2/templates/")
    assert e_method == "PATCH" and e_path.startswith("/v2/serverless/")
    assert e_body["workers"]["max"] == 5 and set(e_body) <= {"workers", "templateId"}
    assert fake.violations == []
    fake.requests.clear()
    assert deploy(url, config, "--image", new_image).returncode == 0
    assert writes(fake) == []


def test_api_errors_show_runpods_message_without_the_key(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    problem = {"title": "Unprocessable Entity", "status": 422,
               "detail": f"no capacity in pool ADA_24 (request by {API_KEY})",
               "errors": ["gpu.pools: try another pool"]}  # fmt: skip
    fake.fail_next[("POST", "/v2/serverless")] = (422, problem)
    done = deploy(url, write_config(tmp_path))
    assert done.returncode == 1
    expected = "POST /v2/serverless: HTTP 422 Unprocessable Entity: no capacity in pool ADA_24"
    assert f"error: {expected}" in done.stderr
    assert "gpu.pools: try another pool" in done.stderr and "***" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_wrong_key_is_reported_without_printing_either_key(runpod, tmp_path: Path) -> None:
    _fake, url = runpod
    done = deploy(url, write_config(tmp_path), key="rpa_WRONGKEY")
    assert done.returncode == 1
    assert "HTTP 401 Unauthorized" in done.stderr
    assert "rpa_WRONGKEY" not in done.stdout + done.stderr


def test_dry_run_sends_nothing_and_prints_valid_requests(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    done = deploy(url, write_config(tmp_path), "--dry-run", key=None)
    assert done.returncode == 0, done.stderr
    assert fake.requests == []
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(x["method"], x["url"]) for x in lines if x["method"] != "GET"] == [
        ("POST", f"{url}/v2/network-volumes"), ("POST", f"{url}/v2/templates"),
        ("POST", f"{url}/v2/serverless"),
    ]  # fmt: skip
    for line in lines:
        path = line["url"].removeprefix(url)
        _route, op = operation(line["method"].lower(), path)
        if "requestBody" in op:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert validate(ref, line["body"]) == [], line


def test_no_api_key_is_a_clear_error(runpod, tmp_path: Path) -> None:
    fake, url = runpod
    done = deploy(url, write_config(tmp_path), key=None)
    assert done.returncode == 1 and "RUNPOD_API_KEY is not set" in done.stderr
    assert fake.requests == []


def test_unreachable_api_is_a_clear_error(tmp_path: Path) -> None:
    done = deploy("http://127.0.0.1:9", write_config(tmp_path))
    assert done.returncode == 1 and "cannot reach RunPod at http://127.0.0.1:9" in done.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"template__env": {"HF_TOKEN": "hf_literal"}}, "template.env.HF_TOKEN looks secret"),
        ({"template__image": "ghcr.io/OWNER/higgs-runpod:latest"}, "template.image must name"),
        ({"endpoint": {"gpu": {}}}, "`endpoint` must be an object with a `name`"),
    ],
)
def test_bad_config_is_refused_before_any_request(
    runpod, tmp_path: Path, changes: dict, message: str
) -> None:
    fake, url = runpod
    done = deploy(url, write_config(tmp_path, **deepcopy(changes)))
    assert done.returncode == 1 and message in done.stderr
    assert fake.requests == []


def test_load_balancing_config_sends_valid_requests(runpod, tmp_path: Path) -> None:
    """deploy/endpoint-http.json: the same image as an HTTP (load-balancing) endpoint."""
    fake, url = runpod
    config = json.loads((ROOT / "deploy/endpoint-http.json").read_text())
    config["template"]["image"] = IMAGE
    path = tmp_path / "endpoint-http.json"
    path.write_text(json.dumps(config))
    done = deploy(url, path, "--dry-run", key=None)
    assert done.returncode == 0, done.stderr
    assert fake.requests == []
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    endpoint = next(
        x["body"] for x in lines if x["method"] == "POST" and x["url"].endswith("/serverless")
    )
    assert (endpoint["type"], endpoint["scaling"]["type"]) == ("LOAD_BALANCER", "REQUEST_COUNT")
    for line in lines:
        _route, op = operation(line["method"].lower(), line["url"].removeprefix(url))
        if "requestBody" in op:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert validate(ref, line["body"]) == [], line
