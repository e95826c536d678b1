"""Issue 12's end-to-end hostile cases against both fronts, one table.

    PYTHONPATH=tests .venv/bin/python bench/abuse.py [--quick] [--front both|http|serve]
        [--cases all|transport|input] [--model tiny|cpu] [--dry-run]

PYTHONPATH=tests puts the test helpers it drives (tests/support/: the hostile clients and
inputs, test code rather than product code) on the path; tests/e2e/test_abuse_bench.py
runs it the same way.

Starts, on loopback with a random checkpoint (tiny by default), `higgs-runpod http` (our
HTTP server, with HIGGS_API_KEY) and `higgs-runpod serve` (RunPod's local API server, the
queue API), then sends each case and prints: the case, the answer (status and the head of
the error message), whether that answer is the one the case wants, seconds, the growth of
the server process's peak memory (VmHWM in /proc) during the case, and whether the server
still answered afterwards.

Cases:
- transport (HTTP front only): slow and hostile clients on raw sockets
  (tests/support/slow_client.py) and httpx: a body dripped a byte at a time, a flood of
  drips past HTTP_MAX_IN_FLIGHT, dripped and idle headers, a bracket bomb, wrong content
  types, no key, oversized bodies.
- input (both fronts): the hostile job inputs of tests/support/abuse_cases.py (decoder and
  download bombs, malformed and private URLs, unbounded work, s3Config to loopback, zero
  frames), served by its HostileServer on loopback; skipped, with a note, where that module
  is absent.

Every case is bounded: one that gets no answer in time is reported as a timeout.
`--quick` shortens the server's timeouts and the flood so that the whole run takes a few
minutes on 2 cores; tests/e2e/test_abuse_bench.py runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from support.slow_client import SlowClient, request_head

KEY = "abuse-bench-key"
AUTH = {"X-API-Key": KEY}
SPEECH = "/v1/audio/speech"
FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Profile:
    body_timeout_s: float
    header_timeout_s: float
    in_flight: int
    flood: int
    case_timeout_s: float
    max_body: int = 20_000_000


QUICK = Profile(body_timeout_s=2, header_timeout_s=1, in_flight=3, flood=6, case_timeout_s=20)
FULL = Profile(body_timeout_s=5, header_timeout_s=3, in_flight=8, flood=20, case_timeout_s=60)


@dataclass(frozen=True)
class Row:
    case: str
    answer: str
    ok: bool
    seconds: float
    peak_growth_mb: float
    serving: bool


@dataclass(frozen=True)
class Case:
    """`run(url)` sends the case and returns (answer, ok)."""

    name: str
    run: Callable[[str], tuple[str, bool]]


def peak_kb(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


def head(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def http_answer(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = "" if response.is_success else response.text
    return head(f"{response.status_code} {message}")


# --- transport cases (our HTTP server) ------------------------------------------------------


def transport_cases(profile: Profile) -> list[Case]:
    body_wait = profile.body_timeout_s + 2
    quick_answer = profile.body_timeout_s + 1.5

    def drip_body(url: str) -> tuple[str, bool]:
        drip = SlowClient(_port(url), request_head(length=1000, headers=AUTH), b"{" * 1000)
        answer = drip.start().answer(timeout=body_wait + 5)
        said = f"{answer.status} after {answer.seconds:.1f} s: {_message(answer.body)}"
        return said, answer.status == 408 and answer.closed and answer.seconds < quick_answer

    def normal_during_drip(url: str) -> tuple[str, bool]:
        drip = SlowClient(_port(url), request_head(length=1000, headers=AUTH), b" " * 1000)
        drip.start()
        response = httpx.post(url + SPEECH, json=_speech(), headers=AUTH, timeout=60)
        dripped = drip.answer(timeout=body_wait + 5)
        said = f"normal {response.status_code}, drip {dripped.status}"
        return said, response.status_code == 200 and dripped.status == 408

    def drip_flood(url: str) -> tuple[str, bool]:
        clients = [
            SlowClient(_port(url), request_head(length=500, headers=AUTH), b" " * 500).start()
            for _ in range(profile.flood)
        ]
        answers = [client.answer(timeout=body_wait + 5) for client in clients]
        counts: dict[Any, int] = {}
        for answer in answers:
            counts[answer.status] = counts.get(answer.status, 0) + 1
        said = ", ".join(f"{n}x {status}" for status, n in sorted(counts.items(), key=str))
        admitted = min(profile.flood, profile.in_flight)
        wanted = {408: admitted}
        if profile.flood > admitted:
            wanted[429] = profile.flood - admitted
        return said, counts == wanted and all(answer.closed for answer in answers)

    def slow_headers(url: str, idle: bool) -> tuple[str, bool]:
        if idle:
            client = SlowClient(_port(url), b"")
        else:
            client = SlowClient(_port(url), request_head(length=2), b"{}", drip_head=True)
        answer = client.start().answer(timeout=profile.header_timeout_s + 10)
        said = f"closed after {answer.seconds:.1f} s" if answer.closed else "still open"
        return said, answer.closed and answer.seconds < profile.header_timeout_s + 1.5

    def post(body: bytes, headers: dict[str, str], status: int) -> Callable[[str], Any]:
        def run(url: str) -> tuple[str, bool]:
            response = httpx.post(url + SPEECH, content=body, headers=headers, timeout=60)
            return http_answer(response), response.status_code == status

        return run

    def oversized_declared(url: str) -> tuple[str, bool]:
        """Content-Length over the limit: refused before a byte of the body is read."""
        declared = request_head(length=profile.max_body + 1, headers=AUTH)
        answer = SlowClient(_port(url), declared, b"{}").start().answer(timeout=10)
        return f"{answer.status} {_message(answer.body)}", answer.status == 413

    def oversized_chunked(url: str) -> tuple[str, bool]:
        piece = b" " * 1_000_000

        def pieces() -> Any:
            for _ in range(profile.max_body // len(piece) + 2):
                yield piece

        headers = {**AUTH, "Content-Type": "application/json"}
        response = httpx.post(url + SPEECH, content=pieces(), headers=headers, timeout=60)
        return http_answer(response), response.status_code == 413

    good = httpx.Request("POST", "/", json=_speech()).content
    json_auth = {**AUTH, "Content-Type": "application/json"}
    return [
        Case("drip-body", drip_body),
        Case("normal-during-drip", normal_during_drip),
        Case(f"drip-flood-{profile.flood}", drip_flood),
        Case("drip-headers", lambda url: slow_headers(url, idle=False)),
        Case("idle-connection", lambda url: slow_headers(url, idle=True)),
        Case("bracket-bomb", post(b"[" * 200_000, json_auth, 400)),
        Case("text-plain", post(good, {**AUTH, "Content-Type": "text/plain"}, 415)),
        Case("form-urlencoded", post(good, {**AUTH, "Content-Type": FORM}, 415)),
        Case("no-content-type", post(good, AUTH, 415)),
        Case("no-key", post(good, {"Content-Type": "application/json"}, 401)),
        Case("wrong-key", post(good, {**json_auth, "X-API-Key": "guess"}, 401)),
        Case("oversized-declared", oversized_declared),
        Case("oversized-chunked", oversized_chunked),
    ]


def _message(body: str) -> str:
    """The message of an error body in OpenAI's shape, else the body's head."""
    try:
        return head(json.loads(body)["error"]["message"], 50)
    except (ValueError, KeyError, TypeError):
        return head(body, 50)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _speech(**fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": "Hello.", "response_format": "wav", "seed": 1,
            "max_new_tokens": 20, **fields}  # fmt: skip


# --- input cases (tests/support/abuse_cases.py, both fronts) ---------------------------------


def input_cases(cases_module: Any, hostile_url: str, front: str) -> list[Case]:
    out = []
    for case in cases_module.cases(hostile_url):
        if front == "http" and case.s3_config is not None:
            continue  # s3Config rides beside a queue job's input only
        out.append(Case(case.name, _input_runner(cases_module, case, front)))
    return out


def _input_runner(cases_module: Any, case: Any, front: str) -> Callable[[str], Any]:
    def run(url: str) -> tuple[str, bool]:
        if front == "http":
            body = cases_module.openai_body(case.input)
            response = httpx.post(url + SPEECH, json=body, headers=AUTH, timeout=None)
            if case.field is None:
                return http_answer(response), response.status_code == 200
            error = response.json().get("error", {}) if not response.is_success else {}
            named = _openai_field(case.field)
            wanted = response.status_code == 400 and named in str(error.get("param", ""))
            return http_answer(response), wanted
        job: dict[str, Any] = {"input": case.input}
        if case.s3_config is not None:
            job["s3Config"] = case.s3_config
        result = httpx.post(url + "/runsync", json=job, timeout=None).json()
        status = result.get("status", "?")
        said = head(f"{status} {result.get('error', '')}")
        if case.field is None:
            return said, status == "COMPLETED"
        return said, status == "FAILED" and str(result.get("error", "")).startswith(case.field)

    return run


def _openai_field(field: str) -> str:
    first, dot, rest = field.partition(".")
    return {"text": "input", "format": "response_format"}.get(first, first) + dot + rest


# --- running ----------------------------------------------------------------------------------


def serving(url: str, front: str) -> bool:
    try:
        if front == "http":
            response = httpx.post(url + SPEECH, json=_speech(), headers=AUTH, timeout=60)
            return response.status_code == 200
        result = httpx.post(url + "/runsync", json={"input": {"text": "Hi.", "max_new_tokens": 8}},
                            timeout=60).json()  # fmt: skip
        return result.get("status") == "COMPLETED"
    except httpx.HTTPError:
        return False


def run_case(case: Case, url: str, pid: int, front: str, timeout_s: float) -> Row:
    """One case, bounded by `timeout_s` (a case left hanging goes on in a daemon thread)."""
    before = peak_kb(pid)
    started = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(case.run, url)
    try:
        answer, ok = future.result(timeout=timeout_s)
    except FutureTimeout:
        answer, ok = f"timeout: no answer in {timeout_s:g} s", False
    except Exception as error:  # the case's own client failed: report it, go on
        answer, ok = head(f"client error: {type(error).__name__}: {error}"), False
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    seconds = time.monotonic() - started
    growth = (peak_kb(pid) - before) / 1024
    return Row(case.name, answer, ok, seconds, growth, serving(url, front))


def server_env(base: dict[str, str], profile: Profile) -> dict[str, str]:
    return {
        **base,
        "HIGGS_API_KEY": KEY,
        "HTTP_BODY_TIMEOUT_S": str(profile.body_timeout_s),
        "HTTP_HEADER_TIMEOUT_S": str(profile.header_timeout_s),
        "HTTP_MAX_IN_FLIGHT": str(profile.in_flight),
        "HTTP_MAX_BODY_BYTES": str(profile.max_body),
        # The input cases download from HostileServer on 127.0.0.1 over plain http.
        "ALLOW_HTTP_AUDIO_URLS": "1",
        "OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32",
        "AUDIO_URL_TIMEOUT_S": "3",
    }


def load_input_cases() -> Any | None:
    try:
        return importlib.import_module("support.abuse_cases")
    except ImportError:
        return None


def plan(args: argparse.Namespace, profile: Profile, module: Any, hostile_url: str) -> dict:
    """front -> its cases."""
    fronts = ("http", "serve") if args.front == "both" else (args.front,)
    plans = {}
    for front in fronts:
        cases: list[Case] = []
        if front == "http" and args.cases in ("all", "transport"):
            cases += transport_cases(profile)
        if module is not None and args.cases in ("all", "input"):
            cases += input_cases(module, hostile_url, front)
        if cases:
            plans[front] = cases
    return plans


def print_table(front: str, rows: list[Row]) -> None:
    print(f"\n{front}:")
    print(f"{'case':26s} {'answer':72s} {'ok':3s} {'s':>6s} {'peak+MB':>8s} serving")
    for row in rows:
        print(
            f"{row.case:26s} {row.answer:72s} {'ok' if row.ok else 'BAD':3s} "
            f"{row.seconds:6.1f} {row.peak_growth_mb:8.1f} {'yes' if row.serving else 'NO'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short timeouts, small flood")
    parser.add_argument("--front", choices=("both", "http", "serve"), default="both")
    parser.add_argument("--cases", choices=("all", "transport", "input"), default="all")
    parser.add_argument("--model", choices=("tiny", "cpu"), default="tiny")
    parser.add_argument(
        "--checkpoint", nargs=2, type=Path, metavar=("MODEL_PATH", "TOKENIZER_PATH"),
        help="use this checkpoint instead of building a random one (--model)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="list the cases, start nothing")
    args = parser.parse_args()
    profile = QUICK if args.quick else FULL
    module = load_input_cases()
    hostile = module.HostileServer() if module is not None and args.cases != "transport" else None
    plans = plan(args, profile, module, hostile.url if hostile else "http://127.0.0.1:9")
    if module is None:
        print("note: tests/support/abuse_cases.py is absent: input cases skipped")
    if args.dry_run:
        for front, cases in plans.items():
            print(f"{front}: {', '.join(case.name for case in cases)}")
        if hostile is not None:
            hostile.close()
        return 0
    from http_first_byte import Server, free_port

    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as directory:
        if args.checkpoint:
            model_path, tokenizer_path = args.checkpoint
        else:
            from http_first_byte import make_checkpoint  # imports torch: seconds

            model_path, tokenizer_path = make_checkpoint(Path(directory), args.model)
        base = {"MODEL_PATH": str(model_path), "TOKENIZER_PATH": str(tokenizer_path),
                "DEVICE": "cpu", "VOICES_PATH": directory}  # fmt: skip
        for front, cases in plans.items():
            ready = "/ping" if front == "http" else "/docs"
            server = Server(front, server_env(base, profile), free_port(), ready)
            try:
                pid = server.process.pid
                results[front] = [
                    run_case(case, server.url, pid, front, profile.case_timeout_s) for case in cases
                ]
            finally:
                try:
                    server.stop()
                except subprocess.TimeoutExpired:  # a case left it busy: it must still go
                    server.process.kill()
    if hostile is not None:
        hostile.close()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; model {args.model}; "
          f"{'quick' if args.quick else 'full'} profile {profile}")  # fmt: skip
    for front, rows in results.items():
        print_table(front, rows)
    bad = sum(not row.ok or not row.serving for rows in results.values() for row in rows)
    print(f"\n{bad} case(s) not answered as wanted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
