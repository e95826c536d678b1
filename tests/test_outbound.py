"""Caller-chosen URLs (outbound.py) and hostile reference clips (audio.py), on loopback.

The payloads are tests/support/abuse_cases.py's, served by its HostileServer: a brotli bomb, a
FLAC decoder bomb, an ffconcat playlist, a drip server. DNS rebinding is played by a
resolver that answers differently the second time: a real DNS server is out of reach of
the system resolver here, so `socket.getaddrinfo` is the one stand-in.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import resource
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from higgs_runpod.errors import RequestError
from higgs_runpod.fronts.runpod import Worker
from higgs_runpod.outbound import OutboundGuard, judged_address
from higgs_runpod.request.schema import CloneFromBase64, CloneFromUrl
from higgs_runpod.request.voices import ReferenceClip, VoiceResolver
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import load_settings
from higgs_runpod.synthesis.engine import Engine
from support import abuse_cases
from support.abuse_cases import HostileServer, b64, ffconcat, flac_bomb, rebinding, wait_for, wav

FIELD = "voice.audio_url"
LOOPBACK = {"ALLOW_HTTP_AUDIO_URLS": "1", "OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32"}


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    try:
        yield server
    finally:
        server.close()


def resolver(voices_dir: Path, **env: str) -> VoiceResolver:
    return VoiceResolver(load_settings({"VOICES_PATH": str(voices_dir), **LOOPBACK, **env}))


def fetch(resolver: VoiceResolver, url: str) -> ReferenceClip:
    voice = CloneFromUrl(audio_url=url, transcript="t")
    return asyncio.run(resolver.resolve_async(voice, "voice"))  # type: ignore[return-value]


def refused(resolver: VoiceResolver, url: str) -> RequestError:
    with pytest.raises(RequestError) as error:
        fetch(resolver, url)
    assert error.value.field == FIELD
    return error.value


# --- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "judged"),
    [
        ("64:ff9b::7f00:1", "127.0.0.1"),  # NAT64 of loopback
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),  # NAT64 of cloud metadata
        ("::7f00:1", "127.0.0.1"),  # IPv4-compatible
        ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped
        ("2002:c0a8:0101::1", "192.168.1.1"),  # 6to4
        ("2606:4700::1111", "2606:4700::1111"),
        ("8.8.8.8", "8.8.8.8"),
    ],
)
def test_embedded_ipv4_decides(address: str, judged: str) -> None:
    assert judged_address(ipaddress.ip_address(address)) == ipaddress.ip_address(judged)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [("64:ff9b::7f00:1", False), ("::7f00:1", False), ("::ffff:10.0.0.1", False), ("::", False),
     ("::1", False), ("224.0.0.1", False), ("2002:7f00:1::", False), ("::ffff:8.8.8.8", True),
     ("64:ff9b::808:808", True), ("8.8.8.8", True)],
)  # fmt: skip
def test_private_addresses_in_any_form_are_refused(address: str, allowed: bool) -> None:
    guard = OutboundGuard.from_settings(load_settings({}))
    assert guard.allowed(ipaddress.ip_address(address)) is allowed


def test_allowed_networks_open_only_themselves() -> None:
    guard = OutboundGuard.from_settings(
        load_settings({"OUTBOUND_ALLOWED_NETWORKS": "127.0.0.2/32,fd00::/8"})
    )
    assert guard.allowed(ipaddress.ip_address("127.0.0.2"))
    assert not guard.allowed(ipaddress.ip_address("64:ff9b::7f00:2"))  # another host's
    assert guard.allowed(ipaddress.ip_address("::ffff:127.0.0.2"))
    assert guard.allowed(ipaddress.ip_address("fd12::1"))
    assert not guard.allowed(ipaddress.ip_address("127.0.0.1"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:99999/a.wav", "has port 99999; a port is 1 to 65535"),
        ("https://[::1", "does not parse"),
        ("https://exa\x01mple.com/a.wav", "without spaces or control characters"),
        ("https://example.com/a b.wav", "without spaces or control characters"),
        ("https://[64:ff9b::7f00:1]/a.wav", "private or loopback"),
        ("https://[::7f00:1]/a.wav", "private or loopback"),
        ("https:///a.wav", "has no host"),
    ],
)
def test_malformed_and_disguised_urls_are_request_errors(
    voices_dir: Path, url: str, message: str
) -> None:
    no_networks = resolver(voices_dir, OUTBOUND_ALLOWED_NETWORKS="")
    assert message in refused(no_networks, url).message


def test_dns_rebinding_connects_to_the_address_that_was_checked(
    voices_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rebind.test` first resolves to 127.0.0.2 (allowed), then to 127.0.0.1 (the internal
    server): the download must come from 127.0.0.2, with the name in the Host header."""
    public = HostileServer("127.0.0.2")
    internal = HostileServer("127.0.0.1", public.port)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding("rebind.test", "127.0.0.2", "127.0.0.1"))
    try:
        env = {"OUTBOUND_ALLOWED_NETWORKS": "127.0.0.2/32"}
        clip = fetch(resolver(voices_dir, **env), f"http://rebind.test:{public.port}/clip.wav")
    finally:
        public.close()
        internal.close()
    assert len(clip.samples) == 24_000
    assert internal.requests == []
    assert public.requests[0][":path"] == "/clip.wav"
    assert public.requests[0]["Host"] == f"rebind.test:{public.port}"
    assert public.requests[0]["Accept-Encoding"] == "identity"


def _tls_for_localhost(directory: Path) -> tuple[ssl.SSLContext, Path, list[str]]:
    """A CA, a server certificate for `localhost` signed by it, the server's TLS context
    (it records each handshake's SNI in the list) and the CA's file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = x509.SubjectAlternativeName([x509.DNSName(subject)])
            builder = builder.add_extension(names, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    server = certificate("localhost", server_key, "test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(
        server.public_bytes(pem)
        + server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem")
    names: list[str] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    return context, directory / "ca.pem", names


def test_https_to_the_checked_address_keeps_sni_and_the_certificate_check(
    voices_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`https://localhost` is fetched from the address that was checked, with SNI
    `localhost` and the certificate verified for that name; the same server by its IP
    fails verification (the certificate names localhost only)."""
    import certifi

    context, ca_file, names = _tls_for_localhost(tmp_path)
    monkeypatch.setattr(certifi, "where", lambda: str(ca_file))  # trust the test CA
    server = HostileServer(tls=context)
    try:
        env = {"OUTBOUND_ALLOWED_NETWORKS": "127.0.0.1/32,::1/128"}
        clip = fetch(resolver(voices_dir, **env), f"https://localhost:{server.port}/clip.wav")
        assert len(clip.samples) == 24_000
        assert names == ["localhost"]
        assert server.requests[0]["Host"] == f"localhost:{server.port}"
        error = refused(resolver(voices_dir, **env), f"{server.url}/clip.wav")
        assert error.message == "download failed (could not connect, or TLS failed)"
    finally:
        server.close()


# --- downloads --------------------------------------------------------------------------------


def test_compressed_download_is_refused_unread(voices_dir: Path, hostile: HostileServer) -> None:
    """809 bytes of brotli that decompress to 1 GiB: refused by its Content-Encoding."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = refused(resolver(voices_dir), f"{hostile.url}/brotli")
    assert "Content-Encoding 'br'" in error.message
    assert "identity" in error.message
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


def test_drip_download_is_cut_at_the_minimum_rate(voices_dir: Path, hostile: HostileServer) -> None:
    """A byte every 0.2 s passes any per-read timeout; the rate check stops it after its
    grace (2 s), well inside the 10 s deadline."""
    started = time.monotonic()
    error = refused(resolver(voices_dir, AUDIO_URL_TIMEOUT_S="10"), f"{hostile.url}/drip")
    assert "download is slower than 32000 bytes/s" in error.message
    assert time.monotonic() - started < 4


def test_steady_download_is_cut_at_the_deadline(voices_dir: Path, hostile: HostileServer) -> None:
    """40 kB/s keeps the minimum rate but would take minutes: one deadline for it all."""
    started = time.monotonic()
    error = refused(resolver(voices_dir, AUDIO_URL_TIMEOUT_S="1.5"), f"{hostile.url}/steady")
    assert error.message == "download did not finish within 1.5 s"
    assert time.monotonic() - started < 3


def _threads_in_downloads() -> list[str]:
    """Threads whose stack is inside an HTTP client."""
    return [
        thread.name
        for thread in threading.enumerate()
        if (frame := sys._current_frames().get(thread.ident or -1)) is not None
        and any("httpx" in entry.filename or "httpcore" in entry.filename
                for entry in traceback.extract_stack(frame))
    ]  # fmt: skip


def test_cancelled_job_closes_its_download_and_leaves_no_thread(
    engine: Engine, base_env: dict, hostile: HostileServer
) -> None:
    worker = Worker(SpeechService(load_settings({**base_env, **LOOPBACK, "AUDIO_URL_TIMEOUT_S": "30",
                                                 "AUDIO_URL_MIN_BYTES_PER_S": "0"}), engine))  # fmt: skip
    drip = next(case for case in abuse_cases.cases(hostile.url) if case.name == "drip-download")
    job = {"id": "j", "input": drip.input}
    baseline = threading.active_count()

    async def cancel_while_downloading() -> None:
        task = asyncio.ensure_future(worker.handle(job))
        await asyncio.sleep(0.8)
        assert hostile.drips_open == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_downloading())
    assert wait_for(lambda: hostile.drips_open == 0, 2.0), "the drip connection stayed open"
    assert _threads_in_downloads() == []
    assert threading.active_count() <= baseline


# --- decoding ---------------------------------------------------------------------------------


def test_flac_decoder_bomb_is_refused_by_its_rate(voices_dir: Path) -> None:
    """8 KB at 10 Hz in 65535-sample frames (157 M samples a frame at 24 kHz): refused on
    its rate, before a sample is resampled."""
    bomb = flac_bomb()
    assert len(bomb) < 10_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    voice = CloneFromBase64(audio_base64=b64(bomb), transcript="t")
    with pytest.raises(RequestError) as error:
        resolver(voices_dir).resolve(voice, "voice")
    assert error.value.field == "voice.audio_base64"
    assert "sample rate of 10 Hz; accepted: 8000 to 384000 Hz" in error.value.message
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100


def test_duration_is_checked_before_resampling(voices_dir: Path) -> None:
    """8 kHz frames of 65535 samples (8.2 s each) against a 5 s limit: the first frame is
    refused on its length, not resampled first."""
    voice = CloneFromBase64(audio_base64=b64(flac_bomb(rate=8000, frames=3)), transcript="t")
    with pytest.raises(RequestError, match="is longer than 5 seconds"):
        resolver(voices_dir, MAX_REF_AUDIO_SECONDS="5").resolve(voice, "voice")


def test_ffconcat_playlist_cannot_open_worker_files(
    voices_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A playlist naming a file in the worker's working directory is not a container we
    take: refused before its header is read, so the file is never opened."""
    (tmp_path / "voice.wav").write_bytes(wav(seconds=2.0))
    monkeypatch.chdir(tmp_path)
    voice = CloneFromBase64(audio_base64=b64(ffconcat("voice.wav")), transcript="t")
    with pytest.raises(RequestError) as error:
        resolver(voices_dir).resolve(voice, "voice")
    assert error.value.field == "voice.audio_base64"
    assert "could not be decoded as audio (accepted containers: WAV, FLAC" in error.value.message
