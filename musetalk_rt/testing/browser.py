"""Headless Chromium with a fake microphone: the browser ingest page as a test sender."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def find_chromium() -> str | None:
    """Debian's ``chromium`` (or ``chromium-browser``) on PATH, else None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def fake_mic_command(chromium: str, profile: Path, wav: Path, url: str) -> list[str]:
    """Argv opening ``url`` headless, granting the microphone and feeding it ``wav``.

    Chromium plays the WAV as the microphone (it loops it; ``%noloop`` is not honoured by every
    version), so a test stops the browser when it has sent enough.
    """
    return [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        url,
    ]


def open_page(chromium: str, profile: Path, wav: Path, url: str) -> subprocess.Popen:
    """Start headless Chromium on ``url`` with ``wav`` as its microphone (output discarded).

    The caller terminates it (``terminate()``, then ``wait()``) when it has what it needs.
    """
    return subprocess.Popen(
        fake_mic_command(chromium, profile, wav, url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
