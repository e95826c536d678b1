"""Real S3-compatible servers on loopback for the tests: moto in server mode.

`StrictStore` serves moto's S3 in this process, behind a small WSGI layer that refuses
boto3's newer default checksums (`x-amz-checksum-*`) the way older R2, MinIO and B2 do, so
every upload through it proves the worker's checksum setting. Anyone may write to it.

`AuthStore` is moto as a subprocess with IAM authentication on (moto keeps that switch
process-wide): one user with one real key pair, so wrong credentials really fail. moto
cannot check presigned (query-string) signatures, so presigned URLs are fetched from
`StrictStore` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from support.servers import stop_process

REGION = "us-east-1"
# Distinctive fake credentials: tests grep outputs and logs for them.
S3_KEY_ID = "AKIATESTKEYID7Q2X9Z"
S3_SECRET = "sEcReT-do-not-print-4f9a1c"
_REFUSED = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>NotImplemented</Code>"
    b"<Message>Header x-amz-checksum-* is not implemented</Message></Error>"
)


def s3_client(url: str, key_id: str = "test", secret: str = "test", **config: Any) -> Any:
    """A plain boto3 client for test set-up and inspection."""
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", **config),
    )


def _refuse_checksums(app: Callable) -> Callable:
    def strict(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if any(
            name.startswith(("HTTP_X_AMZ_CHECKSUM_", "HTTP_X_AMZ_SDK_CHECKSUM_"))
            for name in environ
        ):
            start_response("400 Bad Request", [("Content-Type", "application/xml")])
            return [_REFUSED]
        return app(environ, start_response)

    return strict


class StrictStore:
    """moto's S3 on a free loopback port, refusing requests that carry CRC checksums."""

    def __init__(self) -> None:
        app = _refuse_checksums(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            "127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def client(self, **config: Any) -> Any:
        return s3_client(self.url, **config)

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)


class AuthStore:
    """moto as a subprocess with authentication on; `key_id`/`secret` are the one valid pair."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=dict(os.environ),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()
        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="worker")
        policy = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        iam.put_user_policy(
            UserName="worker",
            PolicyName="s3",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        key = iam.create_access_key(UserName="worker")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        s3_client(self.url, self.key_id, self.secret).create_bucket(Bucket="private")
        # From here on, every request must be signed with a known key.
        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0").raise_for_status()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("moto server exited")
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError("moto server not ready")

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()
