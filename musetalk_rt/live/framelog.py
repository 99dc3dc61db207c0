"""Per-frame timestamps of the live process as JSON lines (``--frame-log FILE``; off by default).

Written for the end-to-end probe (:mod:`musetalk_rt.e2e`), which puts the server's moments next
to its own: every time is ``time.monotonic()`` in seconds, which on Linux is ``CLOCK_MONOTONIC``,
one clock for every process of the host. One line per record, flushed at once (the probe reads
the file while it grows); about 25 lines per second per channel and output.

Records (the key ``ev`` says which):

- ``delay``: how the process chose the playout delay: ``delay_ms``, ``derived`` (false when
  ``--delay-ms`` fixed it), and the start-up figures it was derived from: ``lookahead_ms``,
  ``canvas_ms`` (one whisper encoder call of ``canvases`` canvases), ``batch_ms`` (one batch
  of ``batch`` frames).
- ``start``: a channel's clock started: ``ch``, ``t0``, ``delay_ms`` (frame ``n`` is due at
  ``t0 + delay_ms / 1000 + n / 25``).
- ``session``: a sender connected: ``ch``, ``base_frame`` (the media frame of its first sample;
  sample ``s`` of the session belongs to media frame ``base_frame + s // 640``), ``opened``.
- ``windows``: the audio path handed a channel the whisper windows of ``n`` frames from
  ``frame`` on, at ``t``; ``lead_ms``: how long before the first one's deadline (negative:
  after), ``late``: how many came after their frame had already left (lost to the worker).
- ``frame``: an output wrote a frame: ``ch``, ``out`` (its target), ``frame`` (media frame),
  ``writer`` (1 for the output's first connection, +1 per reconnect), ``index`` (the frame's
  index in that connection's stream: its video timestamp is ``index / 25`` s before any shift
  the muxer applies to all streams), ``kind`` (``speech``: a generated face shown, ``late``: the
  talk weight was up but no generated frame was ready, so the idle frame went out, ``idle``),
  ``speech`` (the voice activity decision for the frame), ``arrival`` (when the ingest handed the
  frame's last audio sample to the channel; null when no sender fed it), ``emitted`` (when the
  clock handed the frame to the outputs) and ``written`` (when the encoder and muxer returned).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from musetalk_rt.errors import UserError


class FrameLog:
    """A thread-safe JSON-lines writer (channels and output threads share one).

    Args:
        path: The file (appended to; its folder must exist).

    Raises:
        UserError: The file cannot be opened.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = self.path.open("a", buffering=1)
        except OSError as exc:
            raise UserError(f"cannot write the frame log {path}: {exc}") from None
        self._lock = threading.Lock()

    def write(self, **record) -> None:
        """Append one record (floats are rounded to microseconds)."""
        rec = {k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()}
        line = json.dumps(rec) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)

    def close(self) -> None:
        """Close the file; later writes are ignored."""
        with self._lock:
            self._file.close()
