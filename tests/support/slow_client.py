"""A hostile HTTP client on a raw socket: it sends a request a few bytes at a time.

Used by tests/e2e/test_http_hardening.py and bench/abuse.py. Real sockets on loopback, no
library in between, so the server sees exactly what a slow or stalled client sends:

    SlowClient(port, head, body).start()  -> sends `head` (status line + headers) and `body`
        `piece` bytes every `every_s` seconds, in a thread, until done or cut off
    .answer(timeout)                      -> what came back, when, and whether the server
        closed the connection
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no response came back
    body: str
    seconds: float  # from start() to the response (or to the close, or the timeout)
    closed: bool  # the server closed the connection


def request_head(
    path: str = "/v1/audio/speech",
    *,
    length: int | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SlowClient:
    """One connection that sends `head` then `body`, `piece` bytes per `every_s` seconds.

    With `drip_head`, the head itself goes out slowly too (a slow-headers client). An empty
    head and body make an idle connection that sends nothing at all.
    """

    def __init__(
        self,
        port: int,
        head: bytes,
        body: bytes = b"",
        *,
        every_s: float = 0.2,
        piece: int = 1,
        drip_head: bool = False,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.head, self.body = head, body
        self.every_s, self.piece, self.drip_head = every_s, piece, drip_head
        self.started = 0.0
        self._sender = threading.Thread(target=self._send, daemon=True)

    def start(self) -> SlowClient:
        self.started = time.monotonic()
        self._sender.start()
        return self

    def _send(self) -> None:
        try:
            if not self.drip_head:
                self.sock.sendall(self.head)
            rest = (self.head if self.drip_head else b"") + self.body
            for start in range(0, len(rest), self.piece):
                self.sock.sendall(rest[start : start + self.piece])
                time.sleep(self.every_s)
        except OSError:
            pass  # the server cut us off, as it should

    def answer(self, timeout: float) -> Answer:
        """Read until the server closes the connection or `timeout` seconds pass."""
        deadline = self.started + timeout
        received = bytearray()
        closed = False
        answered_at = None
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except OSError:  # reset: closed too
                data = b""
            if not data:
                closed = True
                break
            if answered_at is None:
                answered_at = time.monotonic()
            received += data
        self.sock.close()
        ended = answered_at if answered_at is not None else time.monotonic()
        return Answer(*_parse(bytes(received)), seconds=ended - self.started, closed=closed)


def _parse(raw: bytes) -> tuple[int | None, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1]) if head else None
    except (IndexError, ValueError):
        status = None
    return status, body.decode(errors="replace")
