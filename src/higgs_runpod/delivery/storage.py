"""Where a job's audio goes: base64 inline in the response, or an object in an S3 bucket.

    request.output + job["s3Config"] --Storage.plan (before any model work)--> Delivery
    Delivery + encoded audio --Storage.deliver--> the response's audio fields

RunPod caps what a job may return (about 10 MB through `/run`, 20 MB through `/runsync`),
so long audio has to go to a bucket. The bucket comes from the worker's environment
(`S3_*` / `AWS_*`, or RunPod's `BUCKET_*` names) or from the request's top-level
`s3Config`, which replaces the environment's bucket as a whole: a request never borrows
the deployment's credentials for a bucket or endpoint of its own choosing.

Credentials live in `SecretStr` and never reach a message or a log line; neither does a
presigned URL (it is returned to the caller, nowhere else).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import boto3
import httpx
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from pydantic import SecretStr

from higgs_runpod.errors import DeliveryError, RequestError
from higgs_runpod.outbound import OutboundGuard, request_pinned
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis import audio

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# `bucket.s3.region.amazonaws.com` (RunPod's documented BUCKET_ENDPOINT_URL form) or
# `s3.region.amazonaws.com`; the region and the bucket are read from the host.
_AWS_HOST = re.compile(
    r"^(?:(?P<bucket>[a-z0-9][a-z0-9.-]*)\.)?s3[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d)"
    r"\.amazonaws\.com$"
)
ENDPOINT_FIELD = "s3Config.endpointUrl"
ENDPOINT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # as the boto3 client's own
ENDPOINT_ANSWER_BYTES = 1_000_000  # S3 answers a PUT in a few hundred bytes
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_S3_ERROR_HINTS = {
    "NoSuchBucket": "the bucket does not exist",
    "InvalidAccessKeyId": "the access key id is not known to the store",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "AccessDenied": "access denied (the key may not write to this bucket)",
    "InvalidBucketName": "the bucket name is not valid",
    "PermanentRedirect": "the bucket is in another region (set AWS_DEFAULT_REGION)",
    "AuthorizationHeaderMalformed": "the region does not match the bucket's region",
}


@dataclass(frozen=True)
class Bucket:
    """Everything needed to write to one bucket; `source` says where it came from."""

    name: str
    access_key_id: SecretStr
    secret_access_key: SecretStr
    endpoint_url: str | None
    region: str
    source: str  # "the worker's S3 settings" or "the request's s3Config"
    guard: OutboundGuard | None = None  # a caller's endpoint: requests go through outbound.py


@dataclass(frozen=True)
class Delivery:
    """How one job's audio leaves the worker; `bucket` is None when there is none to use."""

    output: Literal["inline", "s3"]
    bucket: Bucket | None


class Storage:
    """The worker's bucket (if any), and the one place that chooses inline or S3."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket, self.missing = bucket_from_settings(settings)
        if self.bucket is not None:
            endpoint = self.bucket.endpoint_url
            where = urlsplit(endpoint).netloc.rpartition("@")[2] if endpoint else "AWS"
            log.info("S3 output on: bucket %r at %s", self.bucket.name, where)
        elif self.missing:
            log.warning(
                "S3 output is off: S3 settings are incomplete, %s not set; "
                "audio is returned inline",
                " and ".join(self.missing),
            )
        else:
            log.info("S3 output is off (no S3_BUCKET): audio is returned inline")

    def plan(self, output: str | None, s3_config: Any) -> Delivery:
        """Choose the delivery for one job, or raise `RequestError` before any model work."""
        bucket = self.bucket
        if s3_config is not None:
            bucket = bucket_from_s3_config(s3_config, self.settings)
        if output == "s3" and bucket is None:
            raise RequestError("output", f"s3 needs a bucket: {self._how_to_configure()}")
        if output is None:
            output = "s3" if bucket is not None else "inline"
        return Delivery(output="s3" if output == "s3" else "inline", bucket=bucket)

    async def deliver(
        self, plan: Delivery, data: bytes, fmt: str, job_id: str | None
    ) -> dict[str, Any]:
        """The response's audio fields: inline base64, or where the uploaded object is."""
        limit = self.settings.max_inline_audio_bytes
        if plan.output == "inline" and len(data) <= limit:
            return {
                "delivery": "inline",
                "audio_base64": base64.b64encode(data).decode("ascii"),
                "size_bytes": len(data),
            }
        if plan.bucket is None:
            raise DeliveryError(
                f"the audio is {len(data):,} bytes, over the {limit:,}-byte limit for inline "
                "output (RunPod caps job results at about 10 MB, base64 adds a third); "
                f"{self._how_to_configure()}, or ask for less audio (shorter text, or "
                "a compressed format such as mp3 or opus)"
            )
        key = object_key(self.settings.s3_prefix, job_id, fmt)
        expires = self.settings.s3_url_expires
        started = time.perf_counter()
        url = await asyncio.to_thread(
            upload, plan.bucket, key, data, audio.CONTENT_TYPES[fmt], expires
        )
        uri = f"s3://{plan.bucket.name}/{key}"
        upload_ms = (time.perf_counter() - started) * 1000.0
        log.info("job %s: uploaded %d bytes to %s in %.0f ms", job_id, len(data), uri, upload_ms)
        return {
            "delivery": "s3",
            "audio_url": url,
            "audio_url_expires_s": expires,
            "s3_uri": uri,
            "size_bytes": len(data),
        }

    def _how_to_configure(self) -> str:
        missing = f" ({' and '.join(self.missing)} not set)" if self.missing else ""
        return (
            "set S3_BUCKET, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY on the worker"
            f"{missing}, or send s3Config with the request"
        )


def bucket_from_settings(settings: Settings) -> tuple[Bucket | None, list[str]]:
    """The environment's bucket, or None and the names of the settings that are missing.

    Missing is empty when no S3 setting is given at all (S3 simply not wanted).
    """
    key_id = settings.aws_access_key_id or settings.bucket_access_key_id
    secret = settings.aws_secret_access_key or settings.bucket_secret_access_key
    endpoint = settings.s3_endpoint_url or settings.bucket_endpoint_url
    endpoint, host_bucket, host_region = _split_aws_endpoint(endpoint)
    name = settings.s3_bucket or host_bucket
    if not any((name, key_id, secret, endpoint)):
        return None, []
    missing = [
        setting
        for setting, value in (
            ("S3_BUCKET", name),
            ("AWS_ACCESS_KEY_ID (or BUCKET_ACCESS_KEY_ID)", key_id),
            ("AWS_SECRET_ACCESS_KEY (or BUCKET_SECRET_ACCESS_KEY)", secret),
        )
        if not value
    ]
    if not (name and key_id and secret):
        return None, missing
    region = settings.aws_default_region or host_region or DEFAULT_REGION
    bucket = Bucket(name, key_id, secret, endpoint, region, "the worker's S3 settings")
    return bucket, []


def bucket_from_s3_config(s3_config: Any, settings: Settings) -> Bucket:
    """RunPod's per-request `s3Config` {accessId, accessSecret, bucketName, endpointUrl}."""
    if not isinstance(s3_config, dict):
        raise RequestError("s3Config", "must be an object")
    values: dict[str, str | None] = {}
    for field in ("accessId", "accessSecret", "bucketName", "endpointUrl"):
        value = s3_config.get(field)
        if value is not None and not isinstance(value, str):
            raise RequestError(f"s3Config.{field}", "must be a string")
        values[field] = value.strip() if value else None
        if field != "endpointUrl" and not values[field]:
            raise RequestError(f"s3Config.{field}", "is required")
    endpoint = values["endpointUrl"]
    guard = None
    if endpoint:  # the caller's endpoint gets audio_url's rules, now and on every request
        guard = OutboundGuard.from_settings(settings)
        guard.addresses(guard.url(endpoint, ENDPOINT_FIELD), ENDPOINT_FIELD)
    endpoint, host_bucket, host_region = _split_aws_endpoint(endpoint)
    return Bucket(
        name=values["bucketName"] or host_bucket or "",
        access_key_id=SecretStr(values["accessId"] or ""),
        secret_access_key=SecretStr(values["accessSecret"] or ""),
        endpoint_url=endpoint,
        region=host_region or settings.aws_default_region or DEFAULT_REGION,
        source="the request's s3Config",
        guard=guard,
    )


def object_key(prefix: str, job_id: str | None, fmt: str) -> str:
    """`<prefix>/<job id>.<format>`: one object per job, found again by the job id."""
    prefix = prefix.strip("/")
    name = _UNSAFE_KEY_CHARS.sub("_", job_id)[:128] if job_id else uuid.uuid4().hex
    return f"{prefix}/{name}.{fmt}" if prefix else f"{name}.{fmt}"


def upload(bucket: Bucket, key: str, data: bytes, content_type: str, expires_s: int) -> str:
    """Put the object and return a presigned GET URL; raise `DeliveryError` on failure."""
    s3 = _client(bucket)
    try:
        s3.put_object(Bucket=bucket.name, Key=key, Body=data, ContentType=content_type)
        return s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket.name, "Key": key}, ExpiresIn=expires_s
        )
    except ClientError as error:
        details = error.response.get("Error", {})
        code = str(details.get("Code", "error"))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        log.error("upload to bucket %r failed: %.100r (HTTP %s)", bucket.name, code, status)
        # Only S3's own codes go back: any other code or text came from whatever server
        # the endpoint is, and is the log's to keep.
        hint = _S3_ERROR_HINTS.get(code)
        said = f"{hint} ({code}, HTTP {status})" if hint else "the store refused the upload"
        raise DeliveryError(
            f"uploading the audio to bucket {bucket.name!r} failed: {said}; check {bucket.source}"
        ) from None
    except BotoCoreError as error:
        host = urlsplit(bucket.endpoint_url).hostname if bucket.endpoint_url else "AWS S3"
        log.error("upload to bucket %r failed: %s", bucket.name, type(error).__name__)
        raise DeliveryError(
            f"uploading the audio to bucket {bucket.name!r} failed: could not reach the "
            f"store at {host} ({type(error).__name__}); check {bucket.source}"
        ) from None


@functools.lru_cache(maxsize=8)
def _client(bucket: Bucket) -> Any:
    """A boto3 S3 client per bucket, made once (creating one costs tens of milliseconds)."""
    config = Config(
        signature_version="s3v4",
        # boto3 >= 1.36 sends CRC checksums on every upload by default; R2, MinIO, B2 and
        # other stores of older vintage reject them. Send them only where S3 requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=bucket.endpoint_url,
        region_name=bucket.region,
        aws_access_key_id=bucket.access_key_id.get_secret_value(),
        aws_secret_access_key=bucket.secret_access_key.get_secret_value(),
        config=config,
    )
    if bucket.guard is not None:
        client.meta.events.register("before-send.s3", functools.partial(_send, bucket.guard))
    return client


class _Answer:
    """A read answer in the shape botocore reads a response's body from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def _send(guard: OutboundGuard, request: AWSPreparedRequest, **_: Any) -> AWSResponse:
    """Send boto3's request to a caller's endpoint through outbound.py: the name judged at
    this moment and the connection made to the judged address (urllib3 would look the name
    up again: DNS rebinding). Failures become botocore's, so its retries still apply."""
    body = request.body.read() if hasattr(request.body, "read") else request.body or b""
    headers = {name: value.decode() if isinstance(value, bytes) else value
               for name, value in request.headers.items() if name.lower() != "expect"}  # fmt: skip
    carried = httpx.Request(request.method, request.url, headers=headers, content=body)
    try:
        response, answer = request_pinned(guard, ENDPOINT_FIELD, carried, ENDPOINT_TIMEOUT,
                                          ENDPOINT_ANSWER_BYTES)  # fmt: skip
    except httpx.HTTPError as error:
        raise EndpointConnectionError(endpoint_url=request.url, error=error) from None
    return AWSResponse(request.url, response.status_code, dict(response.headers), _Answer(answer))


def _split_aws_endpoint(endpoint: str | None) -> tuple[str | None, str | None, str | None]:
    """(endpoint, bucket, region) from an AWS endpoint URL; other stores pass through."""
    if not endpoint:
        return None, None, None
    host = urlsplit(endpoint).hostname or ""
    match = _AWS_HOST.match(host)
    if not match:
        return endpoint, None, None
    region = match["region"]
    return f"https://s3.{region}.amazonaws.com", match["bucket"], region
