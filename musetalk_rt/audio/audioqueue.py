"""A queue of a sender's session messages and audio chunks, bounded in seconds of audio.

The ingest hands audio to a channel's feature thread and to its speech sinks through queues
that must never block the event loop. Counting items would bound nothing useful: a sender's
chunks may hold 8 ms or a second of audio. :class:`AudioQueue` counts samples instead.

Overflow policy: an audio chunk that would take the queued audio past the bound is dropped
and counted; control items (a session's open and close) always get in, since a lost close
leaves a session or an utterance open. With ``fill_drops`` the dropped audio is owed to the
timeline: silence of its length goes in ahead of the next chunk that fits, so the sender's later
audio keeps its place on the media clock; a new session owes nothing to the last one. That
silence goes in whole, past the bound (the timeline needs all of it): after a consumer stalled
for a long time while its sender went on, the queue briefly holds more than ``max_s`` of zeros.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class AudioQueue:
    """A FIFO of control items and audio chunks holding at most ``max_s`` seconds of audio.

    Args:
        max_s: Seconds of audio queued at most.
        sample_rate: The chunks' sample rate, in Hz.
        fill_drops: Owe dropped audio to the timeline as silence (see the module docstring).
    """

    def __init__(self, max_s: float, sample_rate: int, fill_drops: bool = False):
        if max_s <= 0 or sample_rate <= 0:
            raise ValueError(f"max_s and sample_rate must be positive, got {max_s}, {sample_rate}")
        self.max_samples = int(round(max_s * sample_rate))
        self.fill_drops = fill_drops
        self.queued_samples = 0  # audio in the queue now
        self.gap_samples = 0  # audio dropped and not yet given back as silence
        self.dropped_chunks = 0
        self._q: queue.Queue = queue.Queue()  # (item, samples); unbounded: the bound is ours
        self._lock = threading.Lock()

    def put_control(self, item: Any, new_session: bool = False) -> None:
        """Enqueue a control item; never dropped.

        Args:
            item: What :meth:`get` returns for it.
            new_session: The item starts a session: audio dropped before it is forgotten.
        """
        with self._lock:
            if new_session:
                self.gap_samples = 0
            self._q.put_nowait((item, 0))

    def put_audio(self, audio: np.ndarray, wrap: Callable[[np.ndarray], Any]) -> bool:
        """Enqueue one chunk, or drop it when it does not fit.

        Args:
            audio: The chunk's samples (``[N]``).
            wrap: Makes the queued item from a chunk's samples (called for the silence of
                dropped audio too).

        Returns:
            False when the chunk was dropped.
        """
        n = int(audio.size)
        with self._lock:
            if self.queued_samples + n > self.max_samples:
                self.dropped_chunks += 1
                if self.fill_drops:
                    self.gap_samples += n
                return False
            if self.gap_samples:  # the dropped audio's place, as silence
                gap = np.zeros(self.gap_samples, np.float32)
                self._q.put_nowait((wrap(gap), gap.size))
                self.queued_samples += gap.size
                self.gap_samples = 0
            self._q.put_nowait((wrap(audio), n))
            self.queued_samples += n
            return True

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item; raises ``queue.Empty`` after ``timeout`` seconds with none."""
        return self._taken(self._q.get(timeout=timeout))

    def get_nowait(self) -> Any:
        """The oldest item; raises ``queue.Empty`` when there is none."""
        return self._taken(self._q.get_nowait())

    def qsize(self) -> int:
        """Items queued (control items and chunks)."""
        return self._q.qsize()

    def items(self) -> list:
        """A copy of the queued items, oldest first, leaving them queued."""
        with self._q.mutex:
            return [item for item, _ in self._q.queue]

    def _taken(self, entry: tuple[Any, int]) -> Any:
        item, n = entry
        if n:
            with self._lock:
                self.queued_samples -= n
        return item
