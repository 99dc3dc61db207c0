"""Live outputs: H.264 + AAC to RTMP (FLV) or a recording (MP4), fed frame by frame.

:class:`AVStreamWriter` muxes one video frame and its 40 ms of audio at a time (H.264 with
``tune=zerolatency`` and no B-frames, AAC through a FIFO that re-cuts 640-sample chunks into the
encoder's frames). Timestamps come from the frame index, never from the wall clock.

:class:`Output` runs a writer on its own thread behind a bounded queue (overflow policy: drop
the oldest frame, counted), so a slow or dead server never blocks the channel's clock. When
writing fails (the RTMP server went away) it closes the writer and reopens it with exponential
backoff (0.5 s doubling to 8 s), resuming without restarting the process; frames offered while
it is down are dropped and counted (:class:`Backoff`: a writer that fails within a minute of
opening, as on a full disk, doubles the delay; one that ran longer starts again at 0.5 s); a
recording that holds frames is never reopened over: it goes on in ``NAME.part2.mp4``
(:func:`next_part`; a failed file that holds nothing is reused). MP4 recordings are fragmented
(:func:`_crash_safe`), so a run killed mid-show leaves a playable file. With a frame log
(:mod:`.framelog`) it records, for every frame written, when the encoder and muxer returned and
the frame's index in the stream.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from musetalk_rt.media import (  # (not audio.features: no torch in children)
    FPS,
    MP4_SUFFIXES,
    SAMPLE_RATE,
)

log = logging.getLogger("musetalk_rt.output")
AUDIO_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples of 16 kHz audio per video frame


RTMP_SCHEMES = ("rtmp://", "rtmps://")
STABLE_S = 60.0  # a writer that ran this long before failing did not fail from the start


class Backoff:
    """When to try again after a failure: 0.5 s doubling to 8 s, reset by a stable run.

    One rule for a writer that cannot open or fails, and for an output process that died
    (:class:`~.outproc.ProcessOutput`): each failure waits the current delay and doubles the next
    one; a failure of something that had run ``STABLE_S`` or longer is a new fault, not the same
    one, so it waits the first delay again.

    Args:
        first_s: The first delay.
        max_s: The longest delay.
    """

    def __init__(self, first_s: float = 0.5, max_s: float = 8.0):
        self.first_s, self.max_s = first_s, max_s
        self.delay_s = first_s  # what the next failure waits
        self.retry_at = 0.0  # monotonic time before which no retry is made

    def failed(self, now: float, ran_s: float | None = None) -> float:
        """Record a failure at ``now`` (monotonic) and return the delay until the retry.

        Args:
            now: The failure's monotonic time.
            ran_s: How long the failed thing had run, if it had opened at all.
        """
        if ran_s is not None and ran_s >= STABLE_S:
            self.delay_s = self.first_s
        wait_s = self.delay_s
        self.retry_at = now + wait_s
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return wait_s

    def ready(self, now: float) -> bool:
        """Whether a retry may be made at ``now`` (monotonic)."""
        return now >= self.retry_at


def is_rtmp(target: str) -> bool:
    """Whether ``target`` is an RTMP URL (any case of the scheme)."""
    return target.lower().startswith(RTMP_SCHEMES)


def check_rtmp_url(url: str) -> None:
    """Refuse at start an RTMP URL the output could never publish to.

    Found later, FFmpeg's "could not determine output format" would only come from the encoder
    when the first frame is written, while the show ran without its stream.

    Raises:
        ValueError: Not ``rtmp://HOST[:PORT]/APP/KEY`` (the message says what is missing).
    """
    if not url.startswith(RTMP_SCHEMES):
        raise ValueError(
            f"{_hide_key(url)}: expected rtmp://HOST[:PORT]/APP/KEY (or rtmps://), in lower case"
        )
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not host or len(parts) < 2:
        shown = f"{scheme}://{host.rsplit('@', 1)[-1]}/" + ("***" if path else "")
        raise ValueError(
            f"{shown}: expected rtmp://HOST[:PORT]/APP/KEY: the server, its application and the "
            "stream key"
        )


def redact_url(target: str) -> str:
    """``target`` fit for logs and metrics: an RTMP URL's stream key and password hidden.

    The stream key (the last path segment, and a query string, which some servers take the key
    in) and any ``user:password@`` become ``***``; file paths come back unchanged. ``/metrics``
    and the logs are read by more people than the key.
    """
    return _hide_key(target) if is_rtmp(target) else target


def _hide_key(url: str) -> str:
    """A URL-like text with its last path segment, query and password hidden (any scheme)."""
    scheme, sep, rest = url.rpartition("://")
    rest, q, _query = rest.partition("?")
    host, _, path = rest.partition("/")
    if "@" in host:
        host = "***@" + host.rsplit("@", 1)[1]
    parts = path.split("/")
    keyed = [i for i, part in enumerate(parts) if part]
    if len(keyed) >= 2:
        parts[keyed[-1]] = "***"  # (a trailing slash does not hide the key)
    return f"{scheme}{sep}{host}/{'/'.join(parts)}" + ("?***" if q else "")


FRAGMENTED_SUFFIXES = MP4_SUFFIXES  # (the MP4 family: written fragmented)


def _crash_safe(target: str, fmt: str | None) -> dict[str, str]:
    """Muxer options that keep a recording playable if the process dies mid-show.

    A plain MP4 keeps its index (``moov``) for the trailer: a live process killed after hours
    (out of memory, a crash, ``kill -9``) leaves a file no player opens. Fragmented MP4 writes a
    ``moof`` + ``mdat`` fragment at each keyframe (every ``gop_s``), each handed to the operating
    system at once, so a killed run loses at most the fragment being written (a power cut also
    loses what the system had not yet written to the disk: nothing here calls ``fsync``).
    ``delay_moov`` writes the header with the first fragment rather than before any packet, so
    it carries the edit list that trims the AAC encoder's 1024 priming samples (with
    ``empty_moov`` instead the file decoded with them as 64 ms of extra sound and its video
    starting 64 ms in). Players, browsers and FFmpeg read it as any MP4 (the same frames and
    sound onset, to the sample, as a plain MP4); ``ffmpeg -i show.mp4 -c copy -movflags
    +faststart edit.mp4`` makes a plain one for an editor that wants it. Matroska is
    crash-tolerant by design and needs nothing.
    """
    if fmt is not None or not target.lower().endswith(FRAGMENTED_SUFFIXES):
        return {}
    return {"movflags": "frag_keyframe+delay_moov+default_base_moof", "flush_packets": "1"}


def next_part(target: str, part: int) -> str:
    """Where a recording goes on after its writer failed: ``NAME.partN.EXT``, never a used name.

    ``part`` is the first number to try (2 for the first continuation); a file already there
    (an earlier run's) is skipped, so nothing written before is ever truncated. A target that
    is itself a part (``NAME.part3.mp4``) goes on in ``NAME.part4.mp4``.
    """
    p = Path(target)
    stem = p.stem
    if m := re.fullmatch(r"(.+)\.part(\d+)", stem):  # a part failing: the next one, not nested
        stem, part = m.group(1), max(part, int(m.group(2)) + 1)
    while (alt := p.with_name(f"{stem}.part{part}{p.suffix}")).exists():
        part += 1
    return str(alt)


def holds_output(target: str) -> bool:
    """Whether ``target`` is a file that already holds something (never a URL)."""
    if "://" in target:
        return False
    p = Path(target)
    with contextlib.suppress(OSError):
        return p.is_file() and p.stat().st_size > 0
    return False


class AVStreamWriter:
    """Frame-by-frame H.264/AAC muxer to an RTMP URL (FLV) or a file (MP4)."""

    def __init__(
        self,
        target: str,
        width: int,
        height: int,
        fps: int = FPS,
        preset: str = "veryfast",
        gop_s: float = 2.0,
        container_format: str | None = None,
        threads: int | None = None,
    ):
        self.target = target
        fmt = container_format or (
            "flv" if target.startswith(RTMP_SCHEMES) else None
        )  # "null": FFmpeg's null muxer (encode, write nothing: the workbench's profile)
        # (no timeout: PyAV sets none for an output; a stuck server is the parent's watchdog's,
        # musetalk_rt.live.outproc)
        self.container = av.open(
            target, mode="w", format=fmt, container_options=_crash_safe(target, fmt)
        )
        try:
            self._setup(width, height, fps, preset, gop_s, threads)
        except BaseException:
            with contextlib.suppress(Exception):  # the file or socket avio opened
                self.container.close()
            raise

    def _setup(self, width, height, fps, preset, gop_s, threads) -> None:
        self.width, self.height = width + width % 2, height + height % 2
        v = self.container.add_stream(
            "libx264",
            rate=fps,
            options={
                "preset": preset,
                "tune": "zerolatency",
                "bf": "0",
                "g": str(int(gop_s * fps)),
                "crf": "23",
                **({"threads": str(threads)} if threads else {}),  # default: x264's (1.5 x cores)
            },
        )
        v.width, v.height, v.pix_fmt = self.width, self.height, "yuv420p"
        v.time_base = Fraction(1, fps)
        a = self.container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        a.time_base = Fraction(1, SAMPLE_RATE)
        self.video, self.audio = v, a
        self.container.start_encoding()
        self.fifo = av.AudioFifo()
        self.frames = 0
        self.samples = 0

    def write(self, frame: np.ndarray, audio_16k: np.ndarray) -> None:
        """Mux one ``[H, W, 3]`` uint8 RGB frame and its 640 samples of mono float audio."""
        h, w = frame.shape[:2]
        if (w, h) != (self.width, self.height):
            frame = np.pad(frame, ((0, self.height - h), (0, self.width - w), (0, 0)), "edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts, vf.time_base = self.frames, Fraction(1, FPS)
        self.container.mux(self.video.encode(vf))
        self.frames += 1
        af = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(audio_16k, np.float32)[None], format="fltp", layout="mono"
        )
        af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, self.samples, Fraction(1, SAMPLE_RATE)
        self.samples += audio_16k.size
        self.fifo.write(af)
        size = self.audio.codec_context.frame_size or 1024
        while self.fifo.samples >= size:
            self.container.mux(self.audio.encode(self.fifo.read(size)))

    def close(self) -> None:
        """Flush the encoders and close (errors while flushing a dead stream are ignored)."""
        with contextlib.suppress(Exception):
            rest = self.fifo.read()
            if rest is not None:
                self.container.mux(self.audio.encode(rest))
            self.container.mux(self.audio.encode(None))
            self.container.mux(self.video.encode(None))
        with contextlib.suppress(Exception):
            self.container.close()


class Output:
    """One output (RTMP URL or recording path) on its own thread, reconnecting with backoff.

    Args:
        target: ``rtmp://…`` or a file path (``.mp4``).
        width: Frame width.
        height: Frame height.
        queue_frames: Queue bound (frames); when full the oldest is dropped and counted.
        frame_log: A :class:`~.framelog.FrameLog` for the frames offered with metadata.
        encoder_threads: x264 threads of this output (None: x264's default, 1.5 per core —
            with many channels on one host, many outputs together oversubscribe the cores).
    """

    def __init__(
        self,
        target: str,
        width: int,
        height: int,
        queue_frames: int = 50,
        frame_log=None,
        encoder_threads: int | None = None,
    ):
        self.target = target
        self.encoder_threads = encoder_threads
        self.label = redact_url(target)  # what logs, metrics, summaries and the frame log show
        self.frame_log = frame_log
        self._writers = 0  # connections opened so far (the frame log's ``writer``)
        self._file = target  # the file being recorded (or the URL)
        self.width, self.height = width, height
        self.q: queue.Queue = queue.Queue(maxsize=queue_frames)
        self.stats = {
            "written": 0,
            "dropped_full": 0,
            "dropped_down": 0,
            "reconnects": 0,
            "errors": 0,
        }
        self.up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"output {self.label}", daemon=True)
        self._thread.start()

    def _redact(self, exc: Exception) -> str:
        """An error's text with the target's stream key hidden (FFmpeg quotes the URL)."""
        return str(exc).replace(self.target, self.label)

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Ready at once (the thread opens the target with the first frame)."""
        return True

    def depth(self) -> int:
        """Frames waiting for the output thread."""
        return self.q.qsize()

    def offer(self, frame: np.ndarray, audio_16k: np.ndarray, meta: dict | None = None) -> None:
        """Queue a frame (never blocks); ``meta`` goes to the frame log once it is written."""
        while True:
            try:
                self.q.put_nowait((frame, audio_16k, meta))
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.q.get_nowait()
                    self.stats["dropped_full"] += 1

    def _run(self) -> None:
        # the backoff doubles while opening fails or a writer fails soon after it opened (a full
        # disk: it opens, then fails at once); a writer that ran STABLE_S starts again at 0.5 s
        writer, backoff, opened_at = None, Backoff(), 0.0
        while not self._stop.is_set():
            try:
                item = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if writer is None:
                if not backoff.ready(time.monotonic()):
                    self.stats["dropped_down"] += 1
                    continue
                target = self._file
                if self._writers and holds_output(target):
                    # a recording whose writer failed is kept as it is: the rest goes beside it
                    # (one that holds nothing yet, e.g. on a full disk, is simply reopened)
                    target = self._file = next_part(self.target, self._writers + 1)
                    log.warning("output %s: recording continues in %s", self.label, target)
                try:
                    writer = AVStreamWriter(
                        target, self.width, self.height, threads=self.encoder_threads
                    )
                    self._writers += 1
                    if self.stats["written"] or self.stats["errors"]:
                        self.stats["reconnects"] += 1
                    log.info("output %s open", self.label)
                    self.up, opened_at = True, time.monotonic()
                except Exception as exc:  # FFmpeg, the system, or a target FFmpeg cannot name
                    self.stats["errors"] += 1
                    self.stats["dropped_down"] += 1
                    log.warning(
                        "output %s cannot open (%s); retry in %.1f s",
                        self.label,
                        self._redact(exc),
                        backoff.failed(time.monotonic()),
                    )
                    continue
            try:
                writer.write(item[0], item[1])
                self.stats["written"] += 1
                if item[2] is not None and self.frame_log is not None:
                    self.frame_log.write(
                        ev="frame",
                        out=self.label,
                        writer=self._writers,
                        index=writer.frames - 1,
                        written=time.monotonic(),
                        **item[2],
                    )
            except Exception as exc:  # whatever it is, this thread must go on
                self.stats["errors"] += 1
                log.warning("output %s failed (%s); reconnecting", self.label, self._redact(exc))
                writer.close()
                writer, self.up = None, False
                now = time.monotonic()
                backoff.failed(now, ran_s=now - opened_at)
        if writer is not None:
            while not self.q.empty():  # a recording keeps its last frames
                with contextlib.suppress(Exception):
                    writer.write(*self.q.get_nowait()[:2])
                    self.stats["written"] += 1
            writer.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and finish the output (a recording gets its trailer)."""
        self._stop.set()
        self._thread.join(timeout_s)
