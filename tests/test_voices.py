"""Reference voices: the library, inline clips, and URL clips fetched over loopback."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from higgs_runpod.errors import RequestError
from higgs_runpod.request.schema import CloneFromBase64, CloneFromUrl, DescribedVoice
from higgs_runpod.request.voices import ReferenceClip, VoiceDescription, VoiceResolver, list_library
from higgs_runpod.settings import Settings, load_settings
from support.audio import b64, make_wav

CLIP = make_wav(seconds=1.0)


@pytest.fixture(scope="module")
def clip_server() -> Iterator[str]:
    """A loopback HTTP server: /clip.wav, /big.wav (2 MB), /slow.wav (never answers in time)."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/slow.wav":
                release.wait(5)
            body = {"/clip.wav": CLIP, "/big.wav": b"\0" * 2_000_000}.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()


def resolver(voices_dir: Path, **env: str) -> VoiceResolver:
    return VoiceResolver(load_settings({"VOICES_PATH": str(voices_dir), **env}))


@pytest.fixture()
def open_resolver(voices_dir: Path) -> VoiceResolver:
    return resolver(
        voices_dir,
        ALLOW_HTTP_AUDIO_URLS="1",
        ALLOW_PRIVATE_AUDIO_URLS="1",
        MAX_REF_AUDIO_BYTES="1000000",
        AUDIO_URL_TIMEOUT_S="1",
    )


def test_library_lists_voices_with_transcripts(voices_dir: Path, tmp_path: Path) -> None:
    assert [voice.name for voice in list_library(voices_dir)] == ["alice"]
    (tmp_path / "orphan.wav").write_bytes(CLIP)  # no transcript: not a voice
    assert list_library(tmp_path) == []
    assert list_library(tmp_path / "missing") == []


def test_preset_resolves_to_24k_clip(settings: Settings) -> None:
    voice = VoiceResolver(settings).resolve("alice", "voice")
    assert isinstance(voice, ReferenceClip)
    assert voice.transcript == "Hello, I am Alice."
    assert len(voice.samples) == 36_000


def test_unknown_preset_lists_the_library(settings: Settings) -> None:
    with pytest.raises(RequestError, match="unknown voice 'bob' \\(library voices: alice\\)"):
        VoiceResolver(settings).resolve("bob", "voice")


def test_inline_clip_any_format(settings: Settings) -> None:
    flac = make_wav(seconds=1.0, sample_rate=48_000)
    voice = VoiceResolver(settings).resolve(
        CloneFromBase64(audio_base64=b64(flac), transcript="t"), "voice"
    )
    assert isinstance(voice, ReferenceClip)
    assert len(voice.samples) == 24_000


def test_description_passes_through(settings: Settings) -> None:
    voice = VoiceResolver(settings).resolve(DescribedVoice(description="calm"), "voice")
    assert voice == VoiceDescription("calm")


@pytest.mark.parametrize(
    ("data", "env", "message"),
    [
        ("!!notbase64!!", {}, "voice.audio_base64: is not valid base64"),
        (b64(b"RIFF garbage" * 100), {}, "audio could not be decoded"),
        (b64(make_wav(seconds=0.2)), {}, "shorter than 0.5 seconds"),
        (b64(make_wav(seconds=3.0)), {"MAX_REF_AUDIO_SECONDS": "2"}, "longer than 2 seconds"),
        (b64(make_wav(seconds=3.0)), {"MAX_REF_AUDIO_BYTES": "1000"}, "larger than 1000 bytes"),
    ],
)
def test_bad_inline_clips(voices_dir: Path, data: str, env: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        resolver(voices_dir, **env).resolve(
            CloneFromBase64(audio_base64=data, transcript="t"), "voice"
        )


def test_clip_from_url(open_resolver: VoiceResolver, clip_server: str) -> None:
    voice = asyncio.run(
        open_resolver.resolve_async(
            CloneFromUrl(audio_url=f"{clip_server}/clip.wav", transcript="t"), "voice"
        )
    )
    assert isinstance(voice, ReferenceClip)
    assert len(voice.samples) == 24_000


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/big.wav", "larger than 1000000 bytes"),
        ("/missing.wav", "HTTP 404"),
        ("/slow.wav", "download did not finish within 1 s"),
    ],
)
def test_url_failures(
    open_resolver: VoiceResolver, clip_server: str, path: str, message: str
) -> None:
    voice = CloneFromUrl(audio_url=clip_server + path, transcript="t")
    with pytest.raises(RequestError, match=message):
        asyncio.run(open_resolver.resolve_async(voice, "voice"))


@pytest.mark.parametrize(
    ("url", "env", "message"),
    [
        ("http://example.com/a.wav", {}, "must be an https URL"),
        ("ftp://example.com/a.wav", {"ALLOW_HTTP_AUDIO_URLS": "1"}, "must be an https or http URL"),
        ("https://127.0.0.1/a.wav", {}, "private or loopback"),
        ("https://10.1.2.3/a.wav", {}, "private or loopback"),
        ("https://[::1]/a.wav", {}, "private or loopback"),
        ("https://169.254.169.254/latest", {}, "private or loopback"),
        ("https://localhost/a.wav", {}, "private or loopback"),
    ],
)
def test_urls_refused_before_any_request(
    voices_dir: Path, url: str, env: dict, message: str
) -> None:
    voice = CloneFromUrl(audio_url=url, transcript="t")
    with pytest.raises(RequestError, match=message):
        asyncio.run(resolver(voices_dir, **env).resolve_async(voice, "voice"))


def test_unknown_voice_lists_at_most_20_names(settings: Settings, tmp_path: Path) -> None:
    for index in range(45):
        (tmp_path / f"v{index:02d}.wav").write_bytes(CLIP)
        (tmp_path / f"v{index:02d}.txt").write_text("Hi.")
    big = settings.model_copy(update={"voices_path": tmp_path})
    with pytest.raises(RequestError) as error:
        VoiceResolver(big).resolve("bob", "voice")
    message = str(error.value)
    assert message.endswith("and 25 more)")
    assert message.count(", ") == 19
    assert "v44" not in message
