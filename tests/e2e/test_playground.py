"""The playground page in Debian's headless Chromium (driven by Playwright; no browser
download): type, generate, and the audio element gets a playable source.

The server is the real app under uvicorn on a loopback port, in a thread of the test
process, so it shares the session's loaded tiny model. .ci/run installs
chromium-headless-shell with apt when neither Chromium binary is on PATH.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
import uvicorn
from pydantic import SecretStr

from higgs_runpod.fronts.http_api import create_app
from higgs_runpod.service.speech import SpeechService
from higgs_runpod.settings import Settings
from higgs_runpod.synthesis.engine import Engine
from support.audio import make_wav
from support.servers import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
KEY = "page-key-2718"


@pytest.fixture(scope="module")
def page_url(settings: Settings, speech: SpeechService) -> Iterator[str]:
    yield from serve_page(settings, speech)


@pytest.fixture(scope="module")
def keyed_page_url(settings: Settings, speech: SpeechService) -> Iterator[str]:
    """A server behind RunPod's gateway (no Bearer form): the page must send X-API-Key."""
    keyed = settings.model_copy(
        update={"higgs_api_key": SecretStr(KEY), "runpod_endpoint_id": "ep-test"}
    )
    yield from serve_page(keyed, speech)


def serve_page(settings: Settings, speech: SpeechService) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, speech), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_type_generate_and_play(
    page_url: str, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_url)
            expect(page.locator("#voice option[value=alice]")).to_have_count(1)
            page.get_by_label("Text").fill("Hello from the browser test.")
            page.locator("#voice").select_option("alice")
            page.locator("#format").select_option("wav")
            page.get_by_label("Seed").fill("3")
            page.get_by_role("button", name="Generate").click()
            expect(page.get_by_role("status")).to_contain_text("Done", timeout=60_000)
            player = page.locator("#player")
            assert player.get_attribute("src").startswith("blob:")
            duration = player.evaluate(
                """audio => audio.readyState >= 1 ? audio.duration : new Promise(resolve =>
                    audio.addEventListener("loadedmetadata", () => resolve(audio.duration)))"""
            )
            assert duration > 0.5
            assert page.locator("#download").get_attribute("download") == "speech.wav"
            screenshot = tmp_path / "playground.png"
            page.screenshot(path=str(screenshot), full_page=True)
            record_property("screenshot", str(screenshot))
            assert screenshot.stat().st_size > 1000
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_uploaded_clip_and_errors(page_url: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    clip = tmp_path / "me.wav"
    clip.write_bytes(make_wav(seconds=1.0))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_url)
            page.get_by_label("Text").fill("Say it in my voice.")
            page.set_input_files("#clip", str(clip))
            page.get_by_role("button", name="Generate").click()  # no transcript yet
            status = page.get_by_role("status")
            expect(status).to_contain_text("voice.transcript: must not be empty", timeout=30_000)
            assert page.locator("#player").is_hidden()
            page.get_by_label("What the clip says").fill("This is me talking.")
            page.get_by_role("button", name="Generate").click()
            expect(status).to_contain_text("Done", timeout=60_000)
            assert page.locator("#player").get_attribute("src").startswith("blob:")
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_a_take_too_long_to_remember_says_what_to_untick(page_url: str) -> None:
    """Remembering is on by default; a text of several chunks is refused before generation
    with the server's words and the page's hint, and made once the box is unticked."""
    from playwright.sync_api import expect

    with opened(page_url) as page:
        page.get_by_label("Text", exact=True).fill("One more word. " * 40)
        page.locator("#format").select_option("wav")
        page.get_by_label("Max length").fill("20")
        page.get_by_role("button", name="Generate").click()
        status = page.get_by_role("status")
        expect(status).to_contain_text("remember_take: the text makes 2 chunks", timeout=30_000)
        expect(status).to_contain_text("untick “Remember the take” to make it anyway")
        page.get_by_label("Remember the take").uncheck()
        page.get_by_role("button", name="Generate").click()
        expect(status).to_contain_text("Done", timeout=60_000)
        assert page.locator("#keep-box").is_hidden()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_the_key_goes_in_x_api_key(keyed_page_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(keyed_page_url)
            page.get_by_label("Text").fill("Keyed.")
            page.get_by_role("button", name="Generate").click()
            status = page.get_by_role("status")
            expect(status).to_contain_text("X-API-Key", timeout=30_000)  # no key yet: 401
            page.get_by_label("API key").fill(KEY)
            page.get_by_role("button", name="Generate").click()
            expect(status).to_contain_text("Done", timeout=60_000)
        finally:
            browser.close()


@contextmanager
def opened(url: str) -> Iterator[Page]:
    """The page at `url` in headless Chromium, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_mp3_plays_as_it_arrives(page_url: str) -> None:
    """MediaSource gets the chunks as they come: playing starts before the response ends."""
    from playwright.sync_api import expect

    with opened(page_url) as page:
        page.get_by_label("Text").fill("Streamed into the player.")
        page.locator("#format").select_option("mp3")
        page.get_by_label("Seed").fill("3")
        page.get_by_label("Max length").fill("400")
        page.get_by_role("button", name="Generate").click()
        status = page.get_by_role("status")
        expect(status).to_contain_text("Playing as it arrives", timeout=60_000)
        expect(status).to_contain_text("Done", timeout=60_000)
        player = page.locator("#player")
        assert player.get_attribute("src").startswith("blob:")
        assert int(player.get_attribute("data-chunks")) > 1
        buffered = player.evaluate("audio => audio.buffered.end(audio.buffered.length - 1)")
        assert buffered == pytest.approx(400 * 0.04, abs=0.5)  # every frame, less the delay
        assert page.locator("#download").get_attribute("download") == "speech.mp3"


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_type_as_you_go_over_the_websocket(page_url: str) -> None:
    """Typed text goes over the WebSocket: a finished sentence is spoken while typing goes
    on, and Finish speaks the rest."""
    from playwright.sync_api import expect

    with opened(page_url) as page:
        page.get_by_label("Seed").fill("5")
        page.get_by_label("Max length").fill("40")
        live = page.get_by_label("Say it as I type")
        live.press_sequentially("Hello there. And", delay=20)
        segments = page.locator("#segments li")
        expect(segments).to_have_count(1, timeout=60_000)  # spoken before the text ended
        expect(segments.first).to_contain_text("Hello there.")
        live.press_sequentially(" the rest", delay=20)
        page.get_by_role("button", name="Finish").click()
        expect(page.locator("#live-status")).to_contain_text("Done", timeout=60_000)
        expect(segments).to_have_count(2)
        expect(segments.nth(1)).to_contain_text("And the rest")
        buffered = page.locator("#live-player").evaluate(
            "audio => audio.buffered.length ? audio.buffered.end(0) : 0"
        )
        assert buffered > 0.5


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium-headless-shell (.ci/run)")
def test_the_library_upload_keep_and_delete(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """The page lists the library, uploads a clip as a voice, keeps a take, deletes.

    The take kept is the one heard: the page sends its take_id, so the voice's codes are
    the take's as generated and no second speech request is made."""
    from playwright.sync_api import expect, sync_playwright

    voices = tmp_path / "voices"
    clip = tmp_path / "mine.wav"
    clip.write_bytes(make_wav(seconds=1.0, freq=300.0))
    own = settings.model_copy(update={"voices_path": voices})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            with contextmanager(serve_page)(own, SpeechService(own, engine)) as url:
                page = browser.new_page()
                speech_posts: list[str] = []
                page.on(
                    "request",
                    lambda r: (
                        speech_posts.append(r.url)
                        if r.method == "POST" and r.url.endswith("/v1/audio/speech")
                        else None
                    ),
                )
                page.goto(url)
                library = page.locator("#library")
                expect(library.locator("li")).to_have_count(0)
                page.get_by_label("Name", exact=True).fill("mine")
                page.set_input_files("#new-clip", str(clip))
                page.get_by_label("Its transcript").fill("A tone of mine.")
                page.get_by_label("Consent").fill("Synthetic, made by the test.")
                page.get_by_role("button", name="Add to the library").click()
                expect(library).to_contain_text("mine (upload, 1.0 s): “A tone of mine.”")
                expect(page.locator("#voice option[value=mine]")).to_have_count(1)

                page.get_by_label("Text", exact=True).fill("A take worth keeping.")
                page.locator("#format").select_option("wav")
                page.get_by_label("Max length").fill("30")
                page.get_by_role("button", name="Generate").click()
                expect(page.get_by_role("status")).to_contain_text("Done", timeout=60_000)
                take_id = page.evaluate("lastTake")
                take_codes = torch.load(voices / ".takes" / take_id / "codes.pt", weights_only=True)
                page.get_by_label("Keep this voice as").fill("kept")
                page.get_by_role("button", name="Keep this voice").click()
                expect(page.locator("#library-status")).to_contain_text(
                    "Kept as kept.", timeout=60_000
                )
                expect(library).to_contain_text("kept (take")
                assert (voices / "kept" / "codes.pt").is_file()
                kept = torch.load(voices / "kept" / "codes.pt", weights_only=True)["codes"]
                assert torch.equal(kept, take_codes)  # the take heard, not made again
                assert len(speech_posts) == 1
                assert not (voices / ".takes" / take_id).exists()
                assert page.locator("#keep-box").is_hidden()  # a take is kept once

                page.get_by_label("Remember the take").uncheck()
                page.get_by_role("button", name="Generate").click()
                expect(page.get_by_role("status")).to_contain_text("Done", timeout=60_000)
                assert page.locator("#keep-box").is_hidden()  # nothing remembered to keep
                assert page.evaluate("lastTake") is None

                page.get_by_role("button", name="Delete mine").click()
                expect(page.locator("#library-status")).to_contain_text("Deleted mine.")
                expect(library.locator("li")).to_have_count(1)
                assert not (voices / "mine").exists()
        finally:
            browser.close()
