"""Audio to S3: the worker uploads to a real S3-compatible server (moto) on loopback.

Nothing is mocked: the real worker (tiny checkpoint, real transformers classes) encodes
audio, boto3 uploads it over HTTP to moto, and the test fetches the presigned URL over
HTTP and decodes what comes back.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging

import av
import httpx
import pytest
import soundfile
from botocore.exceptions import ClientError
from pydantic import SecretStr

from higgs_runpod.delivery.storage import Bucket, Storage, bucket_from_settings, object_key, upload
from higgs_runpod.errors import RequestError
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine
from support.s3store import S3_KEY_ID, S3_SECRET, AuthStore, StrictStore

TEXT = {"text": "Hello from the bucket.", "seed": 7, "max_new_tokens": 40}


def make_worker(engine: Engine, env: dict[str, str]) -> Worker:
    return Worker(SpeechService(load_settings(env), engine))


def run(worker: Worker, job: dict) -> dict:
    return asyncio.run(worker.handle(job))


def worker_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the worker logged (the in-process store's own access log left out)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name != "werkzeug")


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert S3_SECRET not in text
        assert S3_KEY_ID not in text
        assert "X-Amz-Signature" not in text


# A request's s3Config.endpointUrl gets audio_url's rules: these let it reach moto on loopback.
LOOPBACK_STORES = {"ALLOW_HTTP_AUDIO_URLS": "1", "OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32"}


@pytest.fixture
def s3_worker(engine: Engine, base_env: dict, s3_env: dict) -> Worker:
    return make_worker(engine, {**base_env, **s3_env, **LOOPBACK_STORES})


def test_upload_end_to_end_presigned_url_decodes(
    s3_worker: Worker, s3_store: StrictStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the worker logs at INFO
    result = run(s3_worker, {"id": "job-abc", "input": {**TEXT, "format": "wav"}})
    log_text = worker_log(caplog)

    assert result["delivery"] == "s3"
    assert "audio_base64" not in result
    assert result["s3_uri"] == "s3://audio/higgs-runpod/job-abc.wav"
    assert result["audio_url_expires_s"] == 600
    response = httpx.get(result["audio_url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/wav"
    assert len(response.content) == result["size_bytes"]
    samples, rate = soundfile.read(io.BytesIO(response.content))
    assert rate == result["sample_rate"] == 24_000
    assert len(samples) / rate == pytest.approx(result["duration_s"], abs=1e-3)
    head = s3_store.client().head_object(Bucket="audio", Key="higgs-runpod/job-abc.wav")
    assert head["ContentType"] == "audio/wav"
    assert head["ContentLength"] == result["size_bytes"]
    assert "uploaded" in log_text
    assert_no_secret(log_text, str({k: v for k, v in result.items() if k != "audio_url"}))


def test_mp3_object_has_its_content_type_and_decodes(s3_worker: Worker) -> None:
    result = run(s3_worker, {"id": "job-mp3", "input": {**TEXT, "format": "mp3"}})

    response = httpx.get(result["audio_url"])
    assert response.headers["content-type"] == "audio/mpeg"
    with av.open(io.BytesIO(response.content)) as container:
        stream = container.streams.audio[0]
        assert container.format.name == "mp3"
        frames = list(container.decode(stream))
    assert sum(frame.samples for frame in frames) > 0


def test_strict_store_refuses_default_checksums_but_worker_uploads(s3_store: StrictStore) -> None:
    """The store really rejects boto3's default CRC headers; the worker's client sends none."""
    with pytest.raises(ClientError, match="NotImplemented"):
        s3_store.client().put_object(Bucket="audio", Key="default-client", Body=b"x" * 100)

    credentials = SecretStr(S3_KEY_ID), SecretStr(S3_SECRET)
    bucket = Bucket("audio", *credentials, s3_store.url, "us-east-1", "the worker's S3 settings")
    url = upload(bucket, "checksums/ok.wav", b"RIFF" + b"\0" * 100, "audio/wav", 60)
    assert httpx.get(url).content == b"RIFF" + b"\0" * 100


def test_default_output_follows_configuration(
    engine: Engine, base_env: dict, s3_worker: Worker
) -> None:
    inline_worker = make_worker(engine, base_env)
    inline = run(inline_worker, {"id": "j1", "input": TEXT})
    assert inline["delivery"] == "inline"
    assert inline["size_bytes"] == len(base64.b64decode(inline["audio_base64"]))

    forced_inline = run(s3_worker, {"id": "j2", "input": {**TEXT, "output": "inline"}})
    assert forced_inline["delivery"] == "inline"
    assert "audio_url" not in forced_inline


def test_output_s3_without_bucket_is_a_request_error(engine: Engine, base_env: dict) -> None:
    result = run(make_worker(engine, base_env), {"id": "j", "input": {**TEXT, "output": "s3"}})
    assert result["error"].startswith("output: s3 needs a bucket")
    assert "S3_BUCKET" in result["error"]
    assert "s3Config" in result["error"]


def test_output_field_is_validated(s3_worker: Worker) -> None:
    result = run(s3_worker, {"id": "j", "input": {**TEXT, "output": "ftp"}})
    assert result["error"].startswith("output:")


def test_per_request_s3config_overrides_environment(
    s3_worker: Worker, auth_store: AuthStore, s3_store: StrictStore
) -> None:
    """The job's top-level s3Config (real keys of the authenticating store) wins."""
    s3_config = {
        "accessId": auth_store.key_id,
        "accessSecret": auth_store.secret,
        "bucketName": "private",
        "endpointUrl": auth_store.url,
    }
    result = run(s3_worker, {"id": "job-cfg", "input": TEXT, "s3Config": s3_config})

    assert result["s3_uri"] == "s3://private/higgs-runpod/job-cfg.wav"
    from support.s3store import s3_client

    client = s3_client(auth_store.url, auth_store.key_id, auth_store.secret)
    body = client.get_object(Bucket="private", Key="higgs-runpod/job-cfg.wav")["Body"].read()
    assert len(body) == result["size_bytes"]
    missing = s3_store.client().list_objects_v2(Bucket="audio", Prefix="higgs-runpod/job-cfg")
    assert missing["KeyCount"] == 0
    assert auth_store.secret not in str(result)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [("accessSecret", "wrong-secret", "SignatureDoesNotMatch"),
     ("accessId", "AKIANOSUCHKEY0000000", "InvalidAccessKeyId")],
)  # fmt: skip
def test_wrong_credentials_fail_cleanly_and_worker_keeps_serving(
    s3_worker: Worker,
    auth_store: AuthStore,
    caplog: pytest.LogCaptureFixture,
    field: str,
    value: str,
    code: str,
) -> None:
    s3_config = {
        "accessId": auth_store.key_id,
        "accessSecret": auth_store.secret,
        "bucketName": "private",
        "endpointUrl": auth_store.url,
        field: value,
    }
    caplog.set_level(logging.INFO)  # the worker logs at INFO
    result = run(s3_worker, {"id": "job-bad", "input": TEXT, "s3Config": s3_config})

    assert set(result) == {"error"}
    assert "bucket 'private' failed" in result["error"]
    assert code in result["error"]
    assert "check the request's s3Config" in result["error"]
    for secret in (value, auth_store.secret, auth_store.key_id):
        assert secret not in result["error"]
        assert secret not in worker_log(caplog)
    assert "Traceback" not in worker_log(caplog)
    assert run(s3_worker, {"id": "job-next", "input": TEXT})["delivery"] == "s3"


def test_wrong_credentials_from_environment(
    engine: Engine, base_env: dict, auth_store: AuthStore, caplog: pytest.LogCaptureFixture
) -> None:
    env = {
        **base_env,
        "S3_BUCKET": "private",
        "S3_ENDPOINT_URL": auth_store.url,
        "AWS_ACCESS_KEY_ID": auth_store.key_id,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    }
    caplog.set_level(logging.INFO)  # the worker logs at INFO
    result = run(make_worker(engine, env), {"id": "j", "input": TEXT})
    assert "SignatureDoesNotMatch" in result["error"]
    assert "check the worker's S3 settings" in result["error"]
    assert_no_secret(result["error"], worker_log(caplog))
    assert auth_store.key_id not in worker_log(caplog)


def test_missing_bucket_fails_with_a_clear_message(
    engine: Engine, base_env: dict, s3_env: dict
) -> None:
    worker = make_worker(engine, {**base_env, **s3_env, "S3_BUCKET": "no-such-bucket"})
    result = run(worker, {"id": "j", "input": TEXT})
    assert result["error"] == (
        "uploading the audio to bucket 'no-such-bucket' failed: the bucket does not exist "
        "(NoSuchBucket, HTTP 404); check the worker's S3 settings"
    )


def test_unreachable_store_fails_with_a_clear_message(
    engine: Engine, base_env: dict, s3_env: dict
) -> None:
    from support.servers import free_port

    env = {**base_env, **s3_env, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    result = run(make_worker(engine, env), {"id": "j", "input": TEXT})
    assert "could not reach the store at 127.0.0.1" in result["error"]
    assert_no_secret(result["error"])


def test_runpod_bucket_names_are_accepted(
    engine: Engine, base_env: dict, s3_store: StrictStore
) -> None:
    env = {
        **base_env,
        "S3_BUCKET": "audio",
        "BUCKET_ENDPOINT_URL": s3_store.url,
        "BUCKET_ACCESS_KEY_ID": S3_KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
        "S3_PREFIX": "/runpod/names/",
    }
    result = run(make_worker(engine, env), {"id": "job-rp", "input": TEXT})
    assert result["s3_uri"] == "s3://audio/runpod/names/job-rp.wav"
    assert httpx.get(result["audio_url"]).status_code == 200


def test_runpod_style_aws_endpoint_gives_bucket_and_region() -> None:
    """RunPod documents BUCKET_ENDPOINT_URL as https://BUCKET.s3.REGION.amazonaws.com."""
    settings = load_settings(
        {
            "BUCKET_ENDPOINT_URL": "https://my-audio.s3.eu-west-3.amazonaws.com",
            "BUCKET_ACCESS_KEY_ID": S3_KEY_ID,
            "BUCKET_SECRET_ACCESS_KEY": S3_SECRET,
        }
    )
    bucket, missing = bucket_from_settings(settings)
    assert missing == []
    assert bucket is not None
    assert (bucket.name, bucket.region) == ("my-audio", "eu-west-3")
    assert bucket.endpoint_url == "https://s3.eu-west-3.amazonaws.com"
    assert S3_SECRET not in repr(bucket)


def test_incomplete_settings_name_the_missing_one_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = load_settings({"S3_BUCKET": "audio", "AWS_ACCESS_KEY_ID": S3_KEY_ID})
    storage = Storage(settings)

    assert storage.bucket is None
    assert "AWS_SECRET_ACCESS_KEY (or BUCKET_SECRET_ACCESS_KEY) not set" in caplog.text
    assert "S3_BUCKET" not in caplog.text.split("incomplete")[1].split("not set")[0]
    assert_no_secret(caplog.text)
    with pytest.raises(RequestError) as error:
        storage.plan("s3", None)
    assert error.value.field == "output"
    assert "AWS_SECRET_ACCESS_KEY" in error.value.message
    assert storage.plan(None, None).output == "inline"


def test_no_s3_settings_is_quietly_inline(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    storage = Storage(load_settings({}))
    assert storage.missing == []
    assert "S3 output is off (no S3_BUCKET)" in caplog.text
    assert "WARNING" not in [record.levelname for record in caplog.records]


@pytest.mark.parametrize(
    ("s3_config", "field", "message"),
    [
        ("yes", "s3Config", "must be an object"),
        ({"accessId": "a", "accessSecret": "b"}, "s3Config.bucketName", "is required"),
        ({"accessSecret": "b", "bucketName": "c"}, "s3Config.accessId", "is required"),
        ({"accessId": "a", "accessSecret": 5, "bucketName": "c"}, "s3Config.accessSecret",
         "must be a string"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c", "endpointUrl": "file:///x"},
         "s3Config.endpointUrl", "must be an https or http URL"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c",
          "endpointUrl": "http://127.0.0.2:9/"},
         "s3Config.endpointUrl", "resolves to a private or loopback address"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c",
          "endpointUrl": "http://[::ffff:169.254.169.254]/"},
         "s3Config.endpointUrl", "resolves to a private or loopback address"),
        ({"accessId": "a", "accessSecret": "b", "bucketName": "c",
          "endpointUrl": "http://127.0.0.1:99999/"},
         "s3Config.endpointUrl", "has port 99999; a port is 1 to 65535"),
    ],
)  # fmt: skip
def test_s3config_is_validated_before_any_model_work(
    s3_worker: Worker, s3_config: object, field: str, message: str
) -> None:
    result = run(s3_worker, {"id": "j", "input": TEXT, "s3Config": s3_config})
    assert result == {"error": f"{field}: {message}"}


def test_inline_over_the_limit_says_to_configure_s3(engine: Engine, base_env: dict) -> None:
    worker = make_worker(engine, {**base_env, "MAX_INLINE_AUDIO_BYTES": "1000"})
    result = run(worker, {"id": "j", "input": TEXT})
    assert "bytes, over the 1,000-byte limit for inline output" in result["error"]
    assert "set S3_BUCKET, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result["error"]
    assert "send s3Config" in result["error"]


def test_inline_over_the_limit_uploads_when_s3_is_configured(
    engine: Engine, base_env: dict, s3_env: dict
) -> None:
    worker = make_worker(engine, {**base_env, **s3_env, "MAX_INLINE_AUDIO_BYTES": "1000"})
    result = run(worker, {"id": "job-big", "input": {**TEXT, "output": "inline"}})
    assert result["delivery"] == "s3"
    assert result["size_bytes"] > 1000
    assert httpx.get(result["audio_url"]).status_code == 200


@pytest.mark.parametrize(
    ("prefix", "job_id", "key"),
    [("higgs-runpod/", "abc-123", "higgs-runpod/abc-123.wav"),
     ("", "abc", "abc.wav"),
     ("/a/b/", "../../etc passwd", "a/b/.._.._etc_passwd.wav")],
)  # fmt: skip
def test_object_key_names_the_job(prefix: str, job_id: str, key: str) -> None:
    assert object_key(prefix, job_id, "wav") == key


def test_object_key_without_job_id_is_unique() -> None:
    assert object_key("p", None, "mp3") != object_key("p", None, "mp3")


def test_s3config_endpoint_needs_https_by_default(engine: Engine, base_env: dict) -> None:
    """Without the opt-ins, a caller's endpoint must be https and public (as audio_url)."""
    s3_config = {"accessId": "a", "accessSecret": "b", "bucketName": "c",
                 "endpointUrl": "http://127.0.0.1:9/"}  # fmt: skip
    result = run(make_worker(engine, base_env), {"id": "j", "input": TEXT, "s3Config": s3_config})
    assert result == {"error": "s3Config.endpointUrl: must be an https URL"}


def test_an_endpoints_own_error_code_is_not_echoed(
    s3_worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that is not S3 answers with a code and a message of its own: the caller
    learns only that the store refused; the code stays in the log."""
    from support.abuse_cases import HostileServer

    hostile = HostileServer()
    try:
        s3_config = {"accessId": "a", "accessSecret": "b", "bucketName": "c",
                     "endpointUrl": f"{hostile.url}/s3/"}  # fmt: skip
        caplog.set_level(logging.INFO)
        result = run(s3_worker, {"id": "j", "input": TEXT, "s3Config": s3_config})
    finally:
        hostile.close()
    assert set(result) == {"error"}
    assert "the store refused the upload" in result["error"]
    assert "InternalCode-db7" not in result["error"]
    assert "hunter2" not in result["error"]
    assert "InternalCode-db7" in worker_log(caplog)


def test_s3config_endpoint_is_judged_again_when_boto3_sends(
    s3_worker: Worker, auth_store: AuthStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: `store.test` is moto's 127.0.0.1 (allowed) when the job is planned,
    then 127.0.0.3 when the upload goes out. The upload is judged on the address it would
    connect to and refused; the server on 127.0.0.3 hears nothing."""
    import socket

    from support.abuse_cases import HostileServer, rebinding

    port = int(auth_store.url.rsplit(":", 1)[1])
    internal = HostileServer("127.0.0.3", port)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding("store.test", "127.0.0.1", "127.0.0.3"))
    s3_config = {"accessId": auth_store.key_id, "accessSecret": auth_store.secret,
                 "bucketName": "private", "endpointUrl": f"http://store.test:{port}"}  # fmt: skip
    try:
        result = run(s3_worker, {"id": "job-rebind", "input": TEXT, "s3Config": s3_config})
    finally:
        internal.close()
    assert result == {"error": "s3Config.endpointUrl: resolves to a private or loopback address"}
    assert internal.requests == []
