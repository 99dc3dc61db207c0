"""Captions: cues on the output clock, SRT/WebVTT files, and subtitles burned into the video.

A cue's times are seconds of the *output* stream (media frame ``m`` is at ``m / 25`` s), so a
recording and its ``.srt`` line up whatever the playout delay. Files are appended and flushed
cue by cue: a crash keeps every caption written so far.

Burn-in draws with Pillow's FreeType renderer. CJK text needs a font that has the glyphs; the
default is searched among system fonts (``fc-match`` for Traditional Chinese, then known paths:
Debian's ``fonts-wqy-microhei``, ``fonts-noto-cjk``), checked glyph by glyph, and named in the
error with the install command when none is found. A rendered caption is cached as one RGBA
strip, so a frame costs one alpha blend of that strip.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musetalk_rt.errors import UserError

CJK_PROBE = "說話字幕你好"  # Traditional and common characters the crew writes
_KNOWN_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msjh.ttc",
)
FONT_HINT = "install one (Debian: apt-get install fonts-wqy-microhei) or give caption_font"


@dataclass
class Cue:
    """One caption: ``text`` from ``start_s`` to ``end_s`` of the output stream."""

    index: int
    start_s: float
    end_s: float
    text: str


def _stamp(t_s: float, sep: str) -> str:
    ms = max(0, round(t_s * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def format_cue(cue: Cue, kind: str) -> str:
    """One cue in ``srt`` or ``vtt`` syntax (with its trailing blank line)."""
    sep = "," if kind == "srt" else "."
    head = f"{cue.index + 1}\n" if kind == "srt" else ""
    text = cue.text.replace("-->", "->").strip() or "…"
    return f"{head}{_stamp(cue.start_s, sep)} --> {_stamp(cue.end_s, sep)}\n{text}\n\n"


class CaptionWriter:
    """Append cues to an ``.srt`` or ``.vtt`` file as they come (flushed each time).

    Args:
        path: Output file; the suffix picks the format.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.kind = self.path.suffix.lower().lstrip(".")
        if self.kind not in ("srt", "vtt"):
            raise UserError(f"--captions {path}: use a .srt or .vtt file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--captions {path}: cannot write it ({exc.strerror})") from None
        if self.kind == "vtt":
            self._f.write("WEBVTT\n\n")
            self._f.flush()
        self._lock = threading.Lock()
        self.count = 0

    def add(self, cue: Cue) -> None:
        with self._lock:
            if self._f.closed:
                return
            self._f.write(format_cue(Cue(self.count, cue.start_s, cue.end_s, cue.text), self.kind))
            self._f.flush()
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._f.close()


def parse_srt(text: str) -> list[Cue]:
    """Read SRT (or WebVTT) cues back (used by tests and the e2e probe)."""

    def secs(stamp: str) -> float:
        h, m, rest = stamp.replace(",", ".").split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest)

    cues = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in block.strip().split("\n") if ln]
        for i, ln in enumerate(lines):
            if "-->" in ln:
                a, b = (x.strip().split(" ")[0] for x in ln.split("-->"))
                cues.append(Cue(len(cues), secs(a), secs(b), "\n".join(lines[i + 1 :])))
                break
    return cues


# -- fonts and burn-in -----------------------------------------------------------------------------


def _glyph(font, ch: str) -> bytes:
    mask = font.getmask(ch)
    return bytes(mask) + bytes(str(mask.size), "ascii")


def font_covers(path: str | Path, text: str = CJK_PROBE) -> bool:
    """Whether the font draws every character of ``text`` (not the missing-glyph box)."""
    from PIL import ImageFont

    try:
        font = ImageFont.truetype(str(path), 32)
    except OSError:
        return False
    missing = {_glyph(font, "\ue000"), _glyph(font, "\U0010fffd")}
    chars = [c for c in text if not c.isspace()]
    return all(_glyph(font, c) not in missing and font.getmask(c).getbbox() for c in chars)


def find_cjk_font(explicit: str | None = None) -> Path:
    """A font with Traditional Chinese glyphs (``explicit`` if given, else searched)."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise UserError(f"caption font {p}: no such file")
        if not font_covers(p):
            raise UserError(f"caption font {p}: has no Chinese glyphs; {FONT_HINT}")
        return p
    candidates = []
    if shutil.which("fc-match"):
        for pattern in (":lang=zh-tw", ":lang=zh-cn", ":lang=ja"):
            try:
                out = subprocess.run(
                    ["fc-match", "-f", "%{file}", pattern],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            if out:
                candidates.append(out)
    candidates += list(_KNOWN_FONTS)
    for c in candidates:
        if Path(c).is_file() and font_covers(c):
            return Path(c)
    raise UserError(f"no font with Chinese glyphs was found for burned-in captions; {FONT_HINT}")


def _width(font, text: str) -> int:
    return int(font.getlength(text))


def wrap(text: str, font, max_px: int) -> list[str]:
    """Break ``text`` into lines that fit ``max_px``: at spaces, or between CJK characters."""
    lines: list[str] = []
    cur = ""
    for token in _tokens(text):
        trial = cur + token
        if cur and _width(font, trial.rstrip()) > max_px:
            lines.append(cur.rstrip())
            cur = token.lstrip()
        else:
            cur = trial
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def _tokens(text: str) -> list[str]:
    """Words with their trailing space; each CJK character on its own (it may break anywhere)."""
    out, word = [], ""
    for ch in text:
        wide = unicodedata.east_asian_width(ch) in ("W", "F")
        if wide:
            if word:
                out.append(word)
                word = ""
            out.append(ch)
        elif ch.isspace():
            out.append(word + ch)
            word = ""
        else:
            word += ch
    if word:
        out.append(word)
    return out


class CaptionOverlay:
    """Burn captions into frames, bottom centre, white on a translucent band.

    Args:
        font_path: A font file with the needed glyphs (see :func:`find_cjk_font`).
        frame_size: ``(width, height)`` of the frames.
        max_lines: Lines shown (the last ones, when a caption is long).
    """

    def __init__(self, font_path: str | Path, frame_size: tuple[int, int], max_lines: int = 2):
        from PIL import ImageFont

        w, h = frame_size
        self.size = (w, h)
        self.font_px = max(16, h // 18)
        self.font = ImageFont.truetype(str(font_path), self.font_px)
        self.max_lines = max_lines
        self._cues: list[Cue] = []
        self._lock = threading.Lock()
        self._cache: tuple[str, np.ndarray, np.ndarray, int] | None = None

    def add(self, cue: Cue) -> None:
        with self._lock:
            self._cues = [c for c in self._cues if c.end_s > cue.start_s - 30.0] + [cue]

    def text_at(self, t_s: float) -> str | None:
        with self._lock:
            for c in reversed(self._cues):
                if c.start_s <= t_s < c.end_s:
                    return c.text
        return None

    def _render(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        from PIL import Image, ImageDraw

        w, h = self.size
        lines = wrap(text, self.font, int(w * 0.9))[-self.max_lines :]
        line_h = int(self.font_px * 1.3)
        pad = self.font_px // 3
        band_h = line_h * len(lines) + 2 * pad
        img = Image.new("RGBA", (w, band_h), (0, 0, 0, 140))
        draw = ImageDraw.Draw(img)
        for i, ln in enumerate(lines):
            x = (w - _width(self.font, ln)) // 2
            y = pad + i * line_h
            draw.text(
                (x, y),
                ln,
                font=self.font,
                fill=(255, 255, 255, 255),
                stroke_width=1,
                stroke_fill=(0, 0, 0, 255),
            )
        rgba = np.asarray(img, np.float32)
        alpha = rgba[..., 3:4] / 255.0  # [band_h, W, 1]
        top = max(0, h - band_h - h // 20)
        return rgba[..., :3] * alpha, 1.0 - alpha, top

    def apply(self, frame: np.ndarray, t_s: float) -> np.ndarray:
        """``frame`` with the caption active at ``t_s`` drawn on it (a new array when drawn)."""
        text = self.text_at(t_s)
        if not text:
            return frame
        if self._cache is None or self._cache[0] != text:
            self._cache = (text, *self._render(text))
        _, fg, keep, top = self._cache
        out = frame.copy()
        band = out[top : top + fg.shape[0]]
        n = band.shape[0]
        band[:] = (band.astype(np.float32) * keep[:n] + fg[:n]).astype(np.uint8)
        return out
