"""A small HTTP server on loopback that speaks the part of the Hugging Face hub protocol that
`huggingface_hub` uses to download a model: revision info with file metadata, the file tree,
and `resolve` with the headers the client reads (X-Repo-Commit, ETag, Content-Length) and
Range requests for resuming. It serves directories from disk and counts what it serves.

Used by tests/test_download.py and bench/download_concurrency.py. Not a mock of our code:
the real client talks to it exactly as it talks to huggingface.co (HF_ENDPOINT points here).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 16 * 1024


@dataclass
class HostedFile:
    path: str
    data_path: Path
    size: int
    git_sha1: str
    sha256: str | None  # set for the files served as LFS (weights)

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_sha1


@dataclass
class HostedRepo:
    repo_id: str
    commit: str
    files: dict[str, HostedFile]
    token: str | None = None  # gated: file downloads need this bearer token


@dataclass
class HubCounters:
    requests: list[str] = field(default_factory=list)
    range_starts: list[int] = field(default_factory=list)  # offsets of resumed downloads
    file_gets: Counter = field(default_factory=Counter)  # (repo, path) -> GET count
    bytes_served: int = 0


def host_directory(repo_id: str, directory: Path, token: str | None = None) -> HostedRepo:
    """Describe `directory` as a repo: *.safetensors are LFS files, the rest plain git blobs."""
    files = {}
    digest = hashlib.sha1(repo_id.encode())
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        name = path.relative_to(directory).as_posix()
        git_sha1 = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        sha256 = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else None
        files[name] = HostedFile(name, path, len(data), git_sha1, sha256)
        digest.update(f"{name}:{git_sha1}".encode())
    return HostedRepo(repo_id, digest.hexdigest(), files, token)


class HubServer:
    """`with HubServer(repos) as hub:` serves on http://127.0.0.1:PORT (`hub.url`)."""

    def __init__(self, repos: list[HostedRepo], *, bytes_per_second: float | None = None) -> None:
        self.repos = {repo.repo_id: repo for repo in repos}
        self.bytes_per_second = bytes_per_second
        self.counters = HubCounters()
        self.corrupt_next: set[tuple[str, str]] = set()  # serve these once with flipped bytes
        self.advertised_sizes: dict[tuple[str, str], int] = {}  # lie about sizes in metadata
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = HubCounters()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._handle(self, head=False)

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

        return Handler

    # -- routes -----------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        with self._lock:
            self.counters.requests.append(f"{request.command} {path}")
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            repo = self._repo(request, api[1], api[3])
            if repo:
                self._json(request, self._info(repo) if api[2] == "revision" else self._tree(repo))
        elif resolve:
            repo = self._repo(request, resolve[1], resolve[2])
            if repo and self._authorised(request, repo):
                self._file(request, repo, resolve[3], head=head)
        else:
            self._error(request, 404, "", "Not Found")

    def _repo(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(request, 404, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(request, 404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    def _authorised(self, request: BaseHTTPRequestHandler, repo: HostedRepo) -> bool:
        if repo.token is None or request.headers.get("Authorization") == f"Bearer {repo.token}":
            return True
        self._error(
            request,
            401,
            "GatedRepo",
            f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
            "authenticated to access it. Please log in.",
        )
        return False

    def _size(self, repo: HostedRepo, file: HostedFile) -> int:
        return self.advertised_sizes.get((repo.repo_id, file.path), file.size)

    def _info(self, repo: HostedRepo) -> dict:
        siblings = []
        for file in repo.files.values():
            sibling = {"rfilename": file.path, "size": self._size(repo, file)}
            sibling["blobId"] = file.git_sha1
            if file.sha256:
                sibling["lfs"] = {"sha256": file.sha256, "size": file.size, "pointerSize": 134}
            siblings.append(sibling)
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": False, "gated": bool(repo.token), "siblings": siblings}  # fmt: skip

    def _tree(self, repo: HostedRepo) -> list[dict]:
        entries = []
        for file in repo.files.values():
            entry = {"type": "file", "path": file.path, "size": self._size(repo, file)}
            entry["oid"] = file.git_sha1
            if file.sha256:
                entry["lfs"] = {"oid": file.sha256, "size": file.size, "pointerSize": 134}
            entries.append(entry)
        return entries

    def _file(self, request: BaseHTTPRequestHandler, repo: HostedRepo, name: str, *, head: bool):
        file = repo.files.get(name)
        if file is None:
            self._error(request, 404, "EntryNotFound", "Entry not found")
            return
        data = file.data_path.read_bytes()
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if ranged and not head:
            start = min(int(ranged[1]), len(data))
            with self._lock:
                self.counters.range_starts.append(start)
        body = data[start:]
        if not head:
            with self._lock:
                key = (repo.repo_id, name)
                self.counters.file_gets[key] += 1
                if key in self.corrupt_next:
                    self.corrupt_next.discard(key)
                    body = bytes(byte ^ 0xFF for byte in body)
        request.send_response(206 if start else 200)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("ETag", f'"{file.etag}"')
        request.send_header("X-Repo-Commit", repo.commit)
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if head:
            return
        self._send_body(request, body)

    def _send_body(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        for offset in range(0, len(body), CHUNK):
            chunk = body[offset : offset + CHUNK]
            try:
                request.wfile.write(chunk)
            except OSError:  # the client went away (killed mid-download)
                return
            with self._lock:
                self.counters.bytes_served += len(chunk)
            if self.bytes_per_second:
                time.sleep(len(chunk) / self.bytes_per_second)

    def _json(self, request: BaseHTTPRequestHandler, payload: object) -> None:
        body = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def _error(self, request: BaseHTTPRequestHandler, status: int, code: str, message: str):
        body = json.dumps({"error": message}).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        if code:
            request.send_header("X-Error-Code", code)
        request.send_header("X-Error-Message", message)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)
