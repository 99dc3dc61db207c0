"""Test helpers for the speech path: a channel stand-in that records its audio timeline.

:class:`TimelineChannel` has the interface the speech sinks use of a
:class:`~musetalk_rt.live.channel.LiveChannel` (sessions, ``push``, the media clock) and places
sessions by the same rule — a session starts at the first frame after it opened, or when the
previous one ends — but generates no video. Tests read back exactly which audio would have gone
out, and when.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from musetalk_rt.audio.features import FPS

SPF = 640  # samples per frame at 16 kHz, 25 fps


@dataclass
class RecordedSession:
    """One session: its first media frame and its audio."""

    base_frame: int
    parts: list[np.ndarray] = field(default_factory=list)
    closed: bool = False

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)

    @property
    def end_frame(self) -> int:
        return self.base_frame + -(-self.audio.size // SPF)


class TimelineChannel:
    """Records sessions as a live channel would place them (no video, no models).

    Args:
        name: Channel name.
        delay_s: The playout delay ``D`` used for on-screen times.
    """

    def __init__(self, name: str = "test", delay_s: float = 0.3):
        self.name, self.delay_s = name, delay_s
        self.t0 = time.monotonic()
        self.next_out = 0
        self.sessions: list[RecordedSession] = []
        self._lock = threading.Lock()

    def open_session(self, on_start=None) -> None:
        with self._lock:
            if self.sessions and not self.sessions[-1].closed:
                self.sessions[-1].closed = True
            now_frame = int(np.ceil((time.monotonic() - self.t0) * FPS))
            prev_end = self.sessions[-1].end_frame if self.sessions else 0
            s = RecordedSession(max(now_frame, prev_end))
            self.sessions.append(s)
        if on_start is not None:
            on_start(s.base_frame)

    def push(self, audio_16k: np.ndarray) -> None:
        with self._lock:
            if self.sessions and not self.sessions[-1].closed:
                self.sessions[-1].parts.append(np.asarray(audio_16k, np.float32))

    def close_session(self) -> None:
        with self._lock:
            if self.sessions:
                self.sessions[-1].closed = True

    def sender_stats(self) -> dict:
        return {"sessions": len(self.sessions)}
