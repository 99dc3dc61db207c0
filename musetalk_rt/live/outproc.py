"""A live output in its own process: the encoder and muxer off the live process's interpreter.

Why: on an H200 with 16 channels the audio path alone kept 167 ms of slack before each frame's
deadline, and fell seconds behind as soon as each channel also had its x264/AAC output thread
in the same process — with x264's threads cut to 2 or torch's to 1 alike (experiments/LOG.md).
PyAV releases the interpreter lock inside the encoder, but every output thread takes it back
several times a frame, and each take makes every other thread wait (the wake-up delay rose
tenfold): the channels' feature threads, which release and retake it for every GPU call, fall
behind. In a child process an output costs the live process one copy into shared memory and
one small message a frame.

:class:`ProcessOutput` has the interface of :class:`~.output.Output` (``offer``, ``close``,
``stats``, ``up``, ``label``, ``depth``). The child is a plain subprocess, ``python -m
musetalk_rt.live.outproc`` (it imports only the encoder's modules), running an ordinary
:class:`~.output.Output` (same encoder settings, reconnect with backoff, its own bounded queue
that drops the oldest frame), fed from a ring of ``slots`` frame buffers in shared memory.
Messages are length-prefixed JSON over its stdin and stdout (no pickles): parent to child
first the settings (the ring, the output's target: not on its command line, which every user of
the host can read, as the target may hold a stream key), then ``{"slot", "n", "meta"}`` and
``{"close"}``; child to parent ``{"free": slot}`` once a slot is
copied out, ``{"stats", "up", "depth"}`` every 0.25 s and at the end, ``{"log": record}`` for
the frame log and ``{"ready"}`` once it can take frames.

Overflow policy: when no slot is free (the child is ``slots`` frames behind) the **new** frame
is dropped and counted as ``dropped_full``. If the child dies, the output is down (frames
dropped and counted as ``dropped_down``) and a new child is started after a backoff (0.5 s
doubling to 8 s; back to 0.5 s once a child has run for a minute), counted as a reconnect; a
recording then continues in ``NAME.partN.EXT`` beside the first file, which is never
overwritten.

Stalls: FFmpeg's RTMP output has no timeout here (PyAV opens an output without one, holding
the interpreter lock while it connects), so a server that accepts the connection and then
stops answering, or a network that stops carrying it, would leave the child frozen for good
and the hall screen without a stream. The parent watches each child: no message for
``SILENT_STALL_S`` (its stats come every 0.25 s), or an output that says it is up with frames
waiting and none written for ``WRITE_STALL_S``, and the child is killed (counted as
``stalls``); the restart above takes over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing import shared_memory

import numpy as np

from musetalk_rt.live.output import (
    AUDIO_PER_FRAME,
    RTMP_SCHEMES,
    Backoff,
    next_part,
    redact_url,
)

log = logging.getLogger("musetalk_rt.output")

_STAT_KEYS = ("written", "dropped_full", "dropped_down", "reconnects", "errors")
SILENT_STALL_S = 5.0  # no message from a ready child for this long: it is frozen
WRITE_STALL_S = 10.0  # up, frames waiting, none written for this long: its writer is stuck


def _slot_views(buf, slots: int, width: int, height: int):
    """Per slot: the ``[H, W, 3]`` uint8 frame and ``[640]`` float32 audio views of ``buf``."""
    fb, ab = height * width * 3, AUDIO_PER_FRAME * 4
    views = []
    for s in range(slots):
        base = s * (fb + ab)
        frame = np.ndarray((height, width, 3), np.uint8, buf, base)  # [H, W, 3]
        audio = np.ndarray((AUDIO_PER_FRAME,), np.float32, buf, base + fb)  # [640]
        views.append((frame, audio))
    return views


def _plain(value):
    """JSON for what ``json`` does not know (NumPy scalars in frame metadata)."""
    return value.item() if isinstance(value, np.generic) else str(value)


def _send(stream, lock: threading.Lock, msg: dict) -> None:
    """One message: 4-byte big-endian length + JSON."""
    data = json.dumps(msg, default=_plain).encode()
    with lock:
        stream.write(struct.pack(">I", len(data)) + data)
        stream.flush()


def _recv(stream) -> dict | None:
    """The next message, or None at the end of the stream."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    data = stream.read(n)
    return json.loads(data) if len(data) == n else None


class _PipeFrameLog:
    """The child's frame log: each record goes to the parent, which owns the file."""

    def __init__(self, send):
        self._send = send

    def write(self, **record) -> None:
        self._send({"log": record})


def _child_main(argv: list[str]) -> int:
    """The output process: copy frames out of the ring and feed an ordinary :class:`Output`.

    Its first message on stdin holds the ring's name and size and the output's settings (not
    its command line: ``ps`` shows that to every user of the host, and an RTMP URL holds the
    stream key). Messages come on stdin and go to stdout; logs go to stderr.
    """
    from multiprocessing import resource_tracker

    from musetalk_rt.live.output import Output

    cfg = _recv(sys.stdin.buffer)
    if cfg is None:
        return 2  # the parent went away before it said anything
    # the live process finishes its outputs on SIGINT/SIGTERM (a recording gets its trailer):
    # a signal sent to the whole group must not end this one first; it ends on "close" or EOF
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rx, tx, lock = sys.stdin.buffer, sys.stdout.buffer, threading.Lock()
    sys.stdout = sys.stderr  # nothing else may write into the message stream

    def send(msg: dict) -> None:
        _send(tx, lock, msg)

    shm = shared_memory.SharedMemory(name=cfg["shm"])
    # the parent owns the ring: this process's tracker must not unlink it when it exits
    resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
    views = _slot_views(shm.buf, cfg["slots"], cfg["width"], cfg["height"])
    out = Output(
        cfg["target"],
        cfg["width"],
        cfg["height"],
        queue_frames=cfg["queue_frames"],
        frame_log=_PipeFrameLog(send) if cfg["frame_log"] else None,
        encoder_threads=cfg["encoder_threads"],
    )
    send({"ready": True})
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.25):
            send({"stats": dict(out.stats), "up": out.up, "depth": out.q.qsize()})

    threading.Thread(target=report, name="output stats", daemon=True).start()
    try:
        while (msg := _recv(rx)) is not None and not msg.get("close"):
            frame_v, audio_v = views[msg["slot"]]
            frame, audio = frame_v.copy(), audio_v[: msg["n"]].copy()
            send({"free": msg["slot"]})
            out.offer(frame, audio, msg.get("meta"))
    finally:
        out.close()
        done.set()
        with contextlib.suppress(OSError, ValueError):
            send({"stats": dict(out.stats), "up": False, "depth": 0, "final": True})
        views = frame_v = audio_v = None  # release the buffer before closing it
        shm.close()
    return 0


class ProcessOutput:
    """One output (RTMP URL or recording) encoded in a child process; see the module docstring.

    Args:
        target: ``rtmp://…`` or a file path (``.mp4``).
        width: Frame width.
        height: Frame height.
        queue_frames: The child output's queue bound (frames; drops the oldest).
        frame_log: A :class:`~.framelog.FrameLog` for the frames offered with metadata.
        encoder_threads: x264 threads of this output (None: x264's default).
        slots: Frames in flight between this process and the child (drops the newest beyond).
    """

    def __init__(
        self,
        target: str,
        width: int,
        height: int,
        queue_frames: int = 50,
        frame_log=None,
        encoder_threads: int | None = None,
        slots: int = 8,
    ):
        self.target, self.label = target, redact_url(target)
        self.width, self.height = width, height
        self.frame_log = frame_log
        self._args = (target, width, height, queue_frames, encoder_threads)
        self.slots = slots
        size = slots * (height * width * 3 + AUDIO_PER_FRAME * 4)
        self._shm = shared_memory.SharedMemory(create=True, size=size)
        self._views = _slot_views(self._shm.buf, slots, width, height)
        self._lock = threading.Lock()  # free slots, the child
        self._send_lock = threading.Lock()
        self._child_stats = dict.fromkeys(_STAT_KEYS, 0)  # the current child's own counters
        self._past = dict.fromkeys(_STAT_KEYS, 0)  # counters of children that ended
        self._own = {
            "dropped_full": 0,
            "dropped_down": 0,
            "errors": 0,
            "restarts": 0,
            "stalls": 0,
        }
        self.up = False
        self._child_depth = 0
        self._closing = False
        self._backoff = Backoff()  # a child that ran STABLE_S resets it, as a writer does
        self._start_child()

    # -- child lifecycle ------------------------------------------------------------------------

    def _start_child(self) -> None:
        target, width, height, queue_frames, encoder_threads = self._args
        if self._own["restarts"] and not target.startswith(RTMP_SCHEMES):
            # a recording is not overwritten: what the dead child wrote stays, the rest follows
            target = next_part(target, self._own["restarts"] + 1)
            log.warning("output %s: recording continues in %s", self.label, target)
        cfg = {
            "shm": self._shm.name,
            "slots": self.slots,
            "target": target,
            "width": width,
            "height": height,
            "queue_frames": queue_frames,
            "encoder_threads": encoder_threads,
            "frame_log": self.frame_log is not None,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "musetalk_rt.live.outproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            _send(proc.stdin, self._send_lock, cfg)  # the settings: the first message
        except (OSError, ValueError):
            proc.kill()  # the restart path takes over when its pipe closes
        self._proc, self._conn = proc, proc.stdin
        self._started_at = self._last_msg = self._progress_at = time.monotonic()
        self._killed = False
        self._ready = threading.Event()
        self._free = deque(range(self.slots))
        self._child_stats = dict.fromkeys(_STAT_KEYS, 0)
        self._rx = threading.Thread(
            target=self._receive, args=(proc,), name=f"output rx {self.label}", daemon=True
        )
        self._rx.start()

    def _receive(self, proc: subprocess.Popen) -> None:
        """Read the child's messages until its pipe closes (it ended or died)."""
        while True:
            try:
                msg = _recv(proc.stdout)
            except (OSError, ValueError):
                msg = None
            if msg is None:
                break
            now = time.monotonic()
            if self._proc is proc:
                self._last_msg = now
            if "ready" in msg:
                self._ready.set()
            elif "free" in msg:
                with self._lock:
                    if self._proc is proc:  # (a slot of a dead child's ring is free already)
                        self._free.append(msg["free"])
            elif "stats" in msg:
                stats = {k: msg["stats"].get(k, 0) for k in _STAT_KEYS}
                with self._lock:
                    if stats["written"] != self._child_stats["written"] or not msg["depth"]:
                        self._progress_at = now  # writing, or nothing to write
                    self._child_stats = stats
                    self.up, self._child_depth = bool(msg["up"]), msg["depth"]
            elif "log" in msg and self.frame_log is not None:
                self.frame_log.write(**msg["log"])
        if proc.poll() is None and not self._closing:  # a garbled message: it cannot be trusted
            proc.kill()
        code = proc.wait()
        with self._lock:
            for k in _STAT_KEYS:
                self._past[k] += self._child_stats[k]
            self._child_stats = dict.fromkeys(_STAT_KEYS, 0)
            self.up, self._child_depth = False, 0
            if self._proc is not proc:
                return
            if not self._closing:  # died: count it, start another one after the backoff
                self._own["errors"] += 1
                now = time.monotonic()
                self._backoff.failed(now, ran_s=now - self._started_at)
                log.warning(
                    "output %s: its process ended (exit code %s); restarting", self.label, code
                )
            self._conn = None

    # -- the Output interface -------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        """Counters like :class:`~.output.Output`'s, summed over this output's processes.

        Read under the lock: a child's counters move into the past ones in one step, so a
        scrape never sees them twice (a counter that went down would read as a reset).
        """
        with self._lock:
            s = {k: self._past[k] + self._child_stats[k] for k in _STAT_KEYS}
            for k in ("dropped_full", "dropped_down", "errors"):
                s[k] += self._own[k]
            s["reconnects"] += self._own["restarts"]
            s["stalls"] = self._own["stalls"]
        return s

    def _check_stalled(self, now: float) -> None:
        """Kill a child that stopped talking or stopped writing (under the lock)."""
        if self._killed or not self._ready.is_set():
            return
        silent_s = now - self._last_msg
        stuck_s = now - self._progress_at if self.up and self._child_depth else 0.0
        if silent_s < SILENT_STALL_S and stuck_s < WRITE_STALL_S:
            return
        self._killed = True
        self._own["stalls"] += 1
        what = (
            f"no message for {silent_s:.1f} s"
            if silent_s >= SILENT_STALL_S
            else (f"nothing written for {stuck_s:.1f} s with {self._child_depth} frames waiting")
        )
        log.warning("output %s: its process is stuck (%s); restarting it", self.label, what)
        with contextlib.suppress(OSError):
            self._proc.kill()

    def wait_ready(self, timeout_s: float = 30.0) -> bool:
        """Wait until the child can take frames (it imports the encoder first: ~0.5 s).

        Until then only ``slots`` frames fit; the live process waits for all its outputs before
        its clocks start, so the first frames of a recording are not dropped.
        """
        return self._ready.wait(timeout_s)

    def depth(self) -> int:
        """Frames waiting: in the ring plus in the child's queue."""
        return self.slots - len(self._free) + self._child_depth

    def offer(self, frame: np.ndarray, audio_16k: np.ndarray, meta: dict | None = None) -> None:
        """Copy a frame into a free slot and tell the child (never blocks)."""
        with self._lock:
            if self._conn is not None:
                self._check_stalled(time.monotonic())
            if self._conn is None:
                if self._closing or not self._backoff.ready(time.monotonic()):
                    self._own["dropped_down"] += 1
                    return
                self._own["restarts"] += 1
                try:
                    self._start_child()
                except Exception as exc:  # no process to be had (too many files, no memory)
                    self._own["errors"] += 1
                    self._own["dropped_down"] += 1
                    self._backoff.failed(time.monotonic())
                    log.warning("output %s: cannot start its process (%s)", self.label, exc)
                    return
            if not self._free:
                self._own["dropped_full"] += 1
                return
            if (
                frame.shape != (self.height, self.width, 3)
                or frame.dtype != np.uint8
                or audio_16k.size > AUDIO_PER_FRAME
            ):
                self._own["errors"] += 1  # a caller's bug, not a reason to stop the output
                return
            slot = self._free.popleft()
            fv, av_ = self._views[slot]
            np.copyto(fv, frame)
            av_[: audio_16k.size] = audio_16k
            msg = {"slot": slot, "n": int(audio_16k.size), "meta": meta}
            try:
                _send(self._conn, self._send_lock, msg)
            except (OSError, ValueError):
                self._free.append(slot)
                self._own["dropped_down"] += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the child's output (a recording gets its trailer) and free the ring."""
        with self._lock:
            self._closing = True
            conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError, ValueError):
                _send(conn, self._send_lock, {"close": True})
                conn.close()
        try:
            self._proc.wait(timeout_s + 5.0)  # the child's own close waits up to timeout_s
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(2.0)
        self._rx.join(2.0)
        self._views = []
        self._shm.close()
        self._shm.unlink()


if __name__ == "__main__":
    raise SystemExit(_child_main(sys.argv[1:]))
