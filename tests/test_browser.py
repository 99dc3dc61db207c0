"""The browser ingest page in headless Chromium with a fake microphone fed from a WAV."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
import wave

import numpy as np
import pytest
import soxr

from musetalk_rt.live.ingest import IngestConfig, IngestServer, RecordingSink
from musetalk_rt.media import load_audio
from musetalk_rt.testing.browser import find_chromium, open_page

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (CI installs it)")


class _ServerThread(threading.Thread):
    def __init__(self, sinks, token, port: int = 0):
        super().__init__(daemon=True)
        self.sinks, self.token = sinks, token
        self.ready = threading.Event()
        self.port = port

    def run(self):
        async def main():
            cfg = IngestConfig(port=self.port, token=self.token)
            async with IngestServer(self.sinks, cfg) as srv:
                self.port = srv.port
                self.ready.set()
                while not self.done:
                    await asyncio.sleep(0.1)

        self.done = False
        asyncio.run(main())


def _start_server(sinks, port: int = 0) -> _ServerThread:
    """An ingest server (token ``s3cret``) on its own thread, listening."""
    server = _ServerThread(sinks, "s3cret", port=port)
    server.start()
    assert server.ready.wait(10)
    return server


def _envelope(x: np.ndarray, hop: int = 1600) -> np.ndarray:
    n = len(x) // hop
    return np.sqrt((x[: n * hop].reshape(n, hop) ** 2).mean(axis=1))


def test_page_is_served_in_both_languages():
    server = _ServerThread({"stage": RecordingSink()}, "k")
    server.start()
    assert server.ready.wait(10)
    base = f"http://127.0.0.1:{server.port}"
    page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
    assert "即時收音" in page and "Live ingest" in page and 'lang="zh-Hant"' in page
    js = urllib.request.urlopen(base + "/worklet.js", timeout=5)
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert b"registerProcessor" in js.read()
    chans = urllib.request.urlopen(base + "/channels.json", timeout=5).read()
    assert chans == b'{"channels": ["stage"]}'
    server.done = True


def _mic_wav(speech: np.ndarray, path):
    """The fake microphone's file: ``speech`` at 48 kHz, PCM16."""
    mic48 = soxr.resample(speech, 16000, 48000)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(np.rint(np.clip(mic48, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _wait_for(cond, browser, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        assert browser.poll() is None, "chromium exited"
        time.sleep(0.5)


@pytest.mark.slow
def test_headless_chromium_fake_microphone_streams_the_wav(fixture_file, tmp_path):
    speech = load_audio(fixture_file("eng.wav")).to_mono_16k()[16000 * 2 : 16000 * 8]
    wav = _mic_wav(speech, tmp_path / "mic.wav")
    sink = RecordingSink()
    server = _start_server({"stage": sink})
    url = f"http://127.0.0.1:{server.port}/?channel=stage&token=s3cret&autostart=1"
    browser = open_page(CHROMIUM, tmp_path / "profile", wav, url)
    try:
        deadline = time.monotonic() + 90
        while sink.audio.size < 16000 * 7 and time.monotonic() < deadline:
            assert browser.poll() is None, "chromium exited"
            time.sleep(0.5)
    finally:
        browser.terminate()
        browser.wait(10)
        server.done = True
    got = sink.audio
    assert sink.sessions == 1 and got.size >= 16000 * 7, got.size
    # the page sent the file's speech. Chromium loops the file as the microphone and the page
    # starts sending some way into it, so the received audio is a cyclic shift of the file:
    # compare 6 s of it (after the first half second) with the file repeated, 25 ms envelopes.
    ref = _envelope(np.tile(speech, 3), hop=400)
    env = _envelope(got[8000 : 8000 + speech.size], hop=400)
    best = max(
        np.corrcoef(env, ref[lag : lag + len(env)])[0, 1]
        for lag in range(0, len(ref) - len(env) + 1)
    )
    assert best > 0.9, best


@pytest.mark.slow
def test_the_page_reconnects_by_itself_when_the_server_restarts(fixture_file, tmp_path):
    """The live process restarted (or the network dropped): the page keeps its microphone and
    connects again with backoff, without anyone pressing Start; the new server gets its audio
    as one new session. (Before, the page stopped at the first close and stayed stopped.)"""
    speech = load_audio(fixture_file("eng.wav")).to_mono_16k()[16000 * 2 : 16000 * 8]
    wav = _mic_wav(speech, tmp_path / "mic.wav")
    first = RecordingSink()
    server = _start_server({"stage": first})
    port = server.port
    url = f"http://127.0.0.1:{port}/?channel=stage&token=s3cret&autostart=1"
    browser = open_page(CHROMIUM, tmp_path / "profile", wav, url)
    try:
        _wait_for(lambda: first.audio.size >= 16000 * 2, browser, 90)
        assert first.audio.size >= 16000 * 2
        server.done = True  # the server goes away (its connections closed: 1001)
        server.join(10)
        time.sleep(1.5)  # a second or two down: the page's first retries are refused
        second = RecordingSink()
        server = _start_server({"stage": second}, port=port)
        _wait_for(lambda: second.audio.size >= 16000 * 2, browser, 60)
        assert second.sessions == 1 and second.audio.size >= 16000 * 2, second.audio.size
        assert np.abs(second.audio).max() > 0.05  # speech, not silence
    finally:
        browser.terminate()
        browser.wait(10)
        server.done = True


@pytest.mark.slow
def test_the_page_connects_again_when_the_network_drops_under_an_open_connection(
    fixture_file, tmp_path
):
    """A dropped network leaves the page's socket "open" with nothing arriving (a proxy that
    stops forwarding but keeps its connections). The page notices the missing stats within
    seconds and connects again; the server lets the silent old session of the same tab give way
    and the audio goes on in a second session. (Before, the page showed "Live" for minutes.)"""
    from musetalk_rt.testing.netfault import FreezingProxy

    speech = load_audio(fixture_file("eng.wav")).to_mono_16k()[16000 * 2 : 16000 * 8]
    wav = _mic_wav(speech, tmp_path / "mic.wav")
    sink = RecordingSink()
    server = _start_server({"stage": sink})
    with FreezingProxy("127.0.0.1", server.port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}/?channel=stage&token=s3cret&autostart=1"
        browser = open_page(CHROMIUM, tmp_path / "profile", wav, url)
        try:
            _wait_for(lambda: sink.audio.size >= 16000 * 2, browser, 90)
            assert sink.audio.size >= 16000 * 2 and sink.sessions == 1
            assert proxy.freeze() >= 1  # the ingest socket (and any page fetch still open)
            frozen_at = sink.audio.size
            _wait_for(lambda: sink.sessions >= 2 and sink.audio.size > frozen_at + 32000,
                      browser, 40)  # fmt: skip
        finally:
            browser.terminate()
            browser.wait(10)
            server.done = True
    assert sink.sessions == 2, sink.sessions
    assert sink.audio.size > frozen_at + 32000  # 2 s more after the drop
