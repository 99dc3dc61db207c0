"""Incremental whisper features: push 16 kHz audio, get each frame's window as soon as it can be.

Frame ``f`` (25 fps) is conditioned on whisper steps ``[2f-4, 2f+6)`` (MuseTalk's audio
window): its audio ends 80 ms after the frame does, so no design can emit it before sample
``(f + 3) * 640``.
Whisper's encoder attends over its whole 30 s input, so a step's features also depend on the
audio around it; the offline path encodes fixed 30 s segments and sees *all* of a segment's
future. A stream cannot. This extractor keeps the offline layout — each step at the same
position of the same 30 s segment as offline, so the positional embeddings agree — and encodes,
per group of frames, a **canvas**: the segment's audio from ``context_ms`` before the group up to
``extra_lookahead_ms`` past the group's own look-ahead, with silence after (as offline pads its
last segment). A segment whose audio is complete is encoded once, exactly as offline, and reused.

Placing the audio at other positions (a short canvas starting at position 0) is 5-10x cheaper but
measured 45-60% away from the offline features, because whisper's positional embeddings dominate
its first layers (experiments/LOG.md). With ``canvas="segment"`` frames wait for their whole
segment: exactly the offline features, with up to 30 s of delay — the end point of the parity
curve and the proof that this machinery equals the offline extractor.

Frames are grouped ``hop_frames`` at a time per canvas (fewer encoder calls, ``(hop - 1) × 40``
ms more delay for a group's first frame). Canvases depend only on frame indices, never on how
the audio was chunked, so any chunking gives the same windows (up to float noise). Memory is
bounded: one 30 s segment of audio (two with the segment canvas, whose frames at a segment's end
wait for the next one) and two segments of hidden states. Every canvas has the same shape
(``[80, 3000]`` mel), so the encoder runs without re-compiling (or re-capturing) per call.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from musetalk_rt.audio.features import (
    _PE,
    HIDDEN_STATES,
    SAMPLE_RATE,
    SEGMENT_S,
    WINDOW_STEPS,
    num_frames_for,
    whisper_hidden_states,
)

STEP_SAMPLES = SAMPLE_RATE // 50  # 320 samples = one whisper step (20 ms)
FRAME_SAMPLES = SAMPLE_RATE // 25  # 640 samples = one video frame (40 ms)
MUSETALK_LOOKAHEAD_MS = 80
SEGMENT_SAMPLES = SEGMENT_S * SAMPLE_RATE
SEGMENT_STEPS = SEGMENT_SAMPLES // STEP_SAMPLES
CANVASES = ("aligned", "segment")
CALL_MS_KEPT = 10_000  # encoder call times kept for the median (~7 minutes of a live session)


@dataclass(frozen=True)
class StreamingConfig:
    """How the incremental extractor trades delay and cost against parity with offline.

    Attributes:
        context_ms: Past audio kept on a canvas before the group's first step (multiple of 20;
            at most the 30 s segment; ``None`` = all of the segment so far).
        extra_lookahead_ms: Audio waited for beyond MuseTalk's own 80 ms (multiple of 20).
        hop_frames: Frames per canvas.
        canvas: ``aligned`` (streaming) or ``segment`` (offline-exact, up to 30 s delay).
        max_batch: Canvases per encoder call when several are ready at once.
    """

    context_ms: int | None = None
    extra_lookahead_ms: int = 0
    hop_frames: int = 1
    canvas: str = "aligned"
    max_batch: int = 8

    def __post_init__(self):
        if self.canvas not in CANVASES:
            raise ValueError(f"canvas {self.canvas!r}: choose one of {', '.join(CANVASES)}")
        for name in ("context_ms", "extra_lookahead_ms"):
            v = getattr(self, name)
            if v is not None and (v < 0 or v % 20):
                raise ValueError(f"{name}={v}: must be a non-negative multiple of 20 ms")
        if self.hop_frames < 1 or self.max_batch < 1:
            raise ValueError("hop_frames and max_batch must be at least 1")

    @property
    def extra_samples(self) -> int:
        return self.extra_lookahead_ms * SAMPLE_RATE // 1000

    @property
    def context_samples(self) -> int:
        if self.context_ms is None:
            return SEGMENT_SAMPLES
        return min(self.context_ms * SAMPLE_RATE // 1000, SEGMENT_SAMPLES)

    @property
    def lookahead_ms(self) -> int:
        """Audio needed past a frame's end before it can be emitted (the last of its group)."""
        return MUSETALK_LOOKAHEAD_MS + self.extra_lookahead_ms

    @property
    def added_delay_ms(self) -> int:
        """Worst-case delay beyond MuseTalk's own 80 ms look-ahead (first frame of a group)."""
        if self.canvas == "segment":
            return SEGMENT_S * 1000
        return self.extra_lookahead_ms + (self.hop_frames - 1) * 40

    def describe(self) -> str:
        ctx = "segment" if self.context_ms is None else f"{self.context_ms} ms"
        return (
            f"canvas {self.canvas}, context {ctx}, look-ahead {self.lookahead_ms} ms "
            f"(+{self.extra_lookahead_ms}), hop {self.hop_frames} frame(s), "
            f"added delay {self.added_delay_ms} ms"
        )


# Chosen from the parity curve measured on an H100 with a trained tiny encoder (experiments/LOG.md,
# 2026-11-25): the whole current segment as context (free: every canvas is 30 s anyway) and 80 ms
# of extra look-ahead — a third less error than none (median 24% -> 15%), while the 160 ms total
# look-ahead leaves room for compute inside the 250 ms server-side delay target. No setting within
# 200 ms meets a 2% median; the error falls slowly with more delay (10% at +200, 6% at +1000 ms).
DEFAULT_CONFIG = StreamingConfig(context_ms=None, extra_lookahead_ms=80, hop_frames=1)


@dataclass
class FeatureChunk:
    """Consecutive frames' conditioning windows.

    Attributes:
        start_frame: Index of the first frame.
        windows: ``[n, 50, 384]`` float32 on the encoder's device.
    """

    start_frame: int
    windows: torch.Tensor

    def __len__(self) -> int:
        return int(self.windows.shape[0])


@dataclass
class ExtractorStats:
    """Cost and progress of an incremental extractor."""

    encoder_calls: int = 0
    canvases: int = 0
    frames: int = 0
    skipped_frames: int = 0  # frames :meth:`IncrementalFeatureExtractor.skip_to` passed over
    # the last calls' wall times (a live session lasts hours: 25 calls a second, bounded)
    call_ms: deque = field(default_factory=lambda: deque(maxlen=CALL_MS_KEPT))
    call_ms_total: float = 0.0  # every call's

    def add_call(self, ms: float) -> None:
        self.call_ms.append(ms)
        self.call_ms_total += ms

    @property
    def ms_per_frame(self) -> float:
        """Encoder wall time (mel included) per emitted frame."""
        return self.call_ms_total / self.frames if self.frames else 0.0

    def as_dict(self) -> dict:
        ms = sorted(self.call_ms)
        return {
            "encoder_calls": self.encoder_calls,
            "canvases": self.canvases,
            "frames": self.frames,
            "call_ms_p50": round(ms[len(ms) // 2], 3) if ms else None,
            "ms_per_frame": round(self.ms_per_frame, 3),
        }


def encode_canvases(
    whisper: nn.Module, feature_extractor, canvases: list[np.ndarray], dtype: torch.dtype
) -> torch.Tensor:
    """Whisper hidden states of audio canvases, each padded with silence to 30 s.

    The log-mel STFT runs on the encoder's device; the call ends with a device sync.

    Returns:
        ``[B, 1500, 5, 384]`` float32.
    """
    device = next(whisper.parameters()).device
    mel = feature_extractor(
        canvases,
        sampling_rate=SAMPLE_RATE,
        return_tensors="pt",
        padding="max_length",
        device=str(device),
    ).input_features  # [B, 80, 3000]
    with torch.inference_mode():
        hidden = whisper_hidden_states(whisper, mel.to(device, dtype)).float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return hidden


class BatchedEncoder:
    """One whisper encoder shared by many streams: canvases that arrive together run as one batch.

    Callers on any thread call :meth:`encode` and block until their canvases are done; a single
    worker thread gathers requests for up to ``gather_ms`` (or ``max_batch`` canvases) and runs
    them in one call — on an H100 a batch of 16 costs 2.4 ms per canvas in fp16 against 4.6 ms
    for one canvas alone. The request queue is unbounded in count but each caller has at most
    one request in flight, so it holds at most one request per stream.

    Args:
        whisper: Encoder on its device.
        feature_extractor: transformers ``WhisperFeatureExtractor``.
        dtype: Compute dtype.
        max_batch: Most canvases per call.
        gather_ms: How long the first request waits for company.
        engine: ``canvases -> [B, 1500, 5, 384]`` to run instead of :func:`encode_canvases`
            (the live process passes a :class:`~.canvas_engine.CanvasEncoder`); it must take
            ``max_batch`` canvases in one call.
    """

    def __init__(
        self,
        whisper: nn.Module,
        feature_extractor,
        dtype: torch.dtype = torch.float32,
        max_batch: int = 16,
        gather_ms: float = 2.0,
        engine=None,
    ):
        import queue
        import threading

        self.engine = engine or (
            lambda canvases: encode_canvases(whisper, feature_extractor, canvases, dtype)
        )
        # the CUDA stream the hidden states are made on (the engine's own), None = current
        self.stream = getattr(engine, "stream", None)
        self.max_batch, self.gather_s = max_batch, gather_ms / 1000.0
        self.calls = 0
        self.canvases = 0
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="whisper batcher", daemon=True)
        self._thread.start()

    def encode(self, canvases: list[np.ndarray]) -> torch.Tensor:
        """``[B, 1500, 5, 384]`` for these canvases (blocks; any thread)."""
        from concurrent.futures import Future

        fut: Future = Future()
        self._q.put((canvases, fut))
        return fut.result()

    def _run(self) -> None:
        import queue

        while True:
            first = self._q.get()
            if first is None:
                return
            batch, n = [first], len(first[0])
            deadline = time.monotonic() + self.gather_s
            while n < self.max_batch:
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._q.put(None)
                    break
                batch.append(item)
                n += len(item[0])
            try:
                hidden = self.engine([c for cs, _ in batch for c in cs])
            except Exception as exc:  # hand the error to every waiting caller
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            self.calls += 1
            self.canvases += n
            i = 0
            for cs, fut in batch:
                fut.set_result(hidden[i : i + len(cs)])
                i += len(cs)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5.0)


_PE_ON: dict[str, torch.Tensor] = {}


def _pe_on(device: torch.device, steps: int) -> torch.Tensor:
    """MuseTalk's positional encoding ``[steps, 384]`` kept on ``device`` (one copy, ever)."""
    key = f"{device}:{steps}"
    if key not in _PE_ON:
        _PE_ON[key] = _PE.pe[:steps].to(device)
    return _PE_ON[key]


class IncrementalFeatureExtractor:
    """Push 16 kHz mono audio, pull per-frame ``[50, 384]`` windows as soon as they are due.

    Args:
        whisper: transformers ``WhisperEncoder`` on its device (not modified).
        feature_extractor: transformers ``WhisperFeatureExtractor``.
        config: Context, look-ahead, hop and canvas.
        dtype: Compute dtype of the encoder.
        shared: A :class:`BatchedEncoder` to send canvases to (many streams, one batched call)
            instead of calling the encoder here.
    """

    def __init__(
        self,
        whisper: nn.Module,
        feature_extractor,
        config: StreamingConfig | None = None,
        dtype: torch.dtype = torch.float32,
        shared: BatchedEncoder | None = None,
    ):
        self.shared = shared
        self.whisper = whisper
        self.fe = feature_extractor
        self.config = config or StreamingConfig()
        self.device = next(whisper.parameters()).device
        self.dtype = dtype
        self.stats = ExtractorStats()
        self.received = 0  # 16 kHz samples pushed so far
        self.next_frame = 0  # first frame not yet emitted
        # audio from stream sample self._buf_start on lives in self._arr[self._off : self._end];
        # appending and dropping old audio are amortised O(chunk), never a copy of the buffer
        self._arr = np.zeros(1 << 16, np.float32)
        self._off = self._end = 0
        self._buf_start = 0
        self._exact: dict[int, torch.Tensor] = {}  # complete segment k -> [1500, 5, 384]
        self._final: int | None = None  # total samples, once flushed

    # -- geometry ------------------------------------------------------------------------------

    def _group(self, frame: int) -> range:
        hop = self.config.hop_frames
        first = (frame // hop) * hop
        return range(first, first + hop)

    def _canvas_end(self, group: range) -> int:
        """Last sample (exclusive) a group's canvas holds."""
        if self.config.canvas == "segment":
            end = ((2 * group[-1] + 5) // SEGMENT_STEPS + 1) * SEGMENT_SAMPLES
        else:
            end = (group[-1] + 3) * FRAME_SAMPLES + self.config.extra_samples
        return end if self._final is None else min(end, self._final)

    def frame_ready_at(self, frame: int) -> int:
        """Samples that must have arrived before ``frame`` is emitted (outside a flush)."""
        g = self._group(frame)
        if self.config.canvas == "segment":
            return ((2 * g[-1] + 5) // SEGMENT_STEPS + 1) * SEGMENT_SAMPLES
        return (g[-1] + 3) * FRAME_SAMPLES + self.config.extra_samples

    def _keep_from(self) -> int:
        """The oldest sample any frame from ``next_frame`` on can still need."""
        first_step = max(0, 2 * self.next_frame - 4)
        seg_start = (first_step // SEGMENT_STEPS) * SEGMENT_SAMPLES
        return max(seg_start, first_step * STEP_SAMPLES - self.config.context_samples)

    def _audio(self, start: int, end: int) -> np.ndarray:
        """Samples ``[start, end)`` of the stream (all arrived and kept)."""
        a = self._off + start - self._buf_start
        b = self._off + end - self._buf_start
        assert a >= 0 and end <= self.received, "audio requested that was dropped or not sent"
        return self._arr[a:b]

    # -- encoder ---------------------------------------------------------------------------------

    def _encode(self, canvases: list[np.ndarray]) -> torch.Tensor:
        """Hidden states of 30 s canvases (each padded with silence): ``[B, 1500, 5, 384]``."""
        t0 = time.perf_counter()
        if self.shared is not None:
            hidden = self.shared.encode(canvases)
        else:
            hidden = encode_canvases(self.whisper, self.fe, canvases, self.dtype)
        self.stats.add_call((time.perf_counter() - t0) * 1000.0)
        self.stats.encoder_calls += 1
        self.stats.canvases += len(canvases)
        return hidden

    def _plan(self, group: range) -> list[tuple[int, np.ndarray, bool]]:
        """The canvases a group still needs: ``(segment, audio, exact)``.

        An exact canvas is a complete segment, encoded as offline does and cached for later groups.
        """
        steps_lo = max(0, 2 * group[0] - 4)
        steps_hi = 2 * group[-1] + 5
        end = self._canvas_end(group)
        plan = []
        for k in range(steps_lo // SEGMENT_STEPS, steps_hi // SEGMENT_STEPS + 1):
            seg0, seg1 = k * SEGMENT_SAMPLES, (k + 1) * SEGMENT_SAMPLES
            if seg0 >= end:
                break  # only steps past the audio (zeros) live in this segment
            complete = end >= seg1 or (self._final is not None and end >= self._final)
            if complete and self.config.context_ms is None:  # the whole segment, as offline
                if k not in self._exact:
                    plan.append((k, self._audio(seg0, min(seg1, end)), True))
                continue
            stop = min(seg1, end)
            start = max(seg0, steps_lo * STEP_SAMPLES - self.config.context_samples)
            if start == seg0:  # all of the segment so far: a view, no copy (encoded before
                canvas = self._audio(seg0, stop)  # the next push can touch the buffer)
            else:
                canvas = np.zeros(stop - seg0, np.float32)
                canvas[start - seg0 :] = self._audio(start, stop)
            plan.append((k, canvas, False))
        return plan

    def _windows(self, parts: dict[int, torch.Tensor], frames: range, total_steps: int | None):
        """Cut frames' windows out of per-segment hidden states.

        Steps before 0 or at/after ``total_steps`` (known at the end of the stream) are zeros, as
        offline pads them.
        """
        dev = next(iter(parts.values())).device if parts else self.device
        n = len(frames)
        # the step of every window row, decided on the host: no device sync in this function
        steps = 2 * np.asarray(frames)[:, None] - 4 + np.arange(WINDOW_STEPS)  # [n, 10]
        out = torch.zeros(n * WINDOW_STEPS, HIDDEN_STATES, _PE.pe.shape[1], device=dev)
        flat = steps.reshape(-1)
        for k, hidden in parts.items():  # hidden [1500, 5, 384]
            local = flat - k * SEGMENT_STEPS
            sel = (local >= 0) & (local < SEGMENT_STEPS)
            if total_steps is not None:
                sel &= flat < total_steps
            rows = np.flatnonzero(sel)
            if rows.size:
                dst = torch.from_numpy(rows).to(dev, non_blocking=True)
                src = torch.from_numpy(local[rows]).to(dev, non_blocking=True)
                out.index_copy_(0, dst, hidden.index_select(0, src))
        windows = out.reshape(n, WINDOW_STEPS * HIDDEN_STATES, -1)  # [n, 50, 384]
        return windows + _pe_on(dev, windows.shape[1])

    def _emit(self, last_frame: int, total_steps: int | None) -> FeatureChunk | None:
        """Windows of frames up to ``last_frame``; on the shared encoder's CUDA stream if any.

        That stream is synchronised before the windows are returned: another thread (the GPU
        worker, on its own stream) reads them next.
        """
        stream = getattr(self.shared, "stream", None)
        if stream is None:
            return self._emit_windows(last_frame, total_steps)
        with torch.cuda.stream(stream):
            chunk = self._emit_windows(last_frame, total_steps)
        stream.synchronize()
        return chunk

    def _emit_windows(self, last_frame: int, total_steps: int | None) -> FeatureChunk | None:
        if last_frame < self.next_frame:
            return None
        first = self.next_frame
        groups, f = [], first
        while f <= last_frame:
            g = self._group(f)
            groups.append(range(f, min(g[-1], last_frame) + 1))
            f = g[-1] + 1
        out = []
        bs = self.config.max_batch
        for i in range(0, len(groups), bs):  # groups in batches; their canvases in one call
            batch = groups[i : i + bs]
            jobs = []
            for g in batch:
                for k, audio, exact in self._plan(self._group(g[0])):
                    if not (exact and any(j[1] == k and j[3] for j in jobs)):
                        jobs.append((g.start, k, audio, exact))
            hidden = self._encode([j[2] for j in jobs]) if jobs else []
            own: dict[tuple[int, int], torch.Tensor] = {}
            for (g_start, k, _, exact), h in zip(jobs, hidden, strict=True):
                if exact:  # kept ~30 s: its own copy, not a view pinning the whole batch
                    self._exact[k] = h.clone()
                else:
                    own[(g_start, k)] = h
            for g in batch:
                lo, hi = max(0, 2 * g[0] - 4) // SEGMENT_STEPS, (2 * g[-1] + 5) // SEGMENT_STEPS
                parts = {}
                for k in range(lo, hi + 1):
                    if (g.start, k) in own:
                        parts[k] = own[(g.start, k)]
                    elif k in self._exact:
                        parts[k] = self._exact[k]
                out.append(self._windows(parts, g, total_steps))
        self.next_frame = last_frame + 1
        self.stats.frames += self.next_frame - first
        self._trim()
        return FeatureChunk(first, torch.cat(out))

    def _trim(self) -> None:
        keep = min(self._keep_from(), self.received)
        if keep > self._buf_start:
            self._off += keep - self._buf_start
            self._buf_start = keep
        first_seg = max(0, 2 * self.next_frame - 4) // SEGMENT_STEPS
        for k in [k for k in self._exact if k < first_seg]:
            del self._exact[k]

    # -- public ------------------------------------------------------------------------------

    def push(self, audio_16k: np.ndarray) -> FeatureChunk | None:
        """Add 16 kHz mono samples; return the frames that became ready (or None).

        Raises:
            RuntimeError: After :meth:`flush` (start a new extractor for a new stream).
        """
        if self._final is not None:
            raise RuntimeError("push() after flush(): this stream has ended")
        audio_16k = np.asarray(audio_16k, dtype=np.float32).reshape(-1)
        if audio_16k.size:
            self._append(audio_16k)
            self.received += audio_16k.size
        last = self.next_frame - 1
        while self.frame_ready_at(last + 1) <= self.received:
            last = self._group(last + 1)[-1]
        return self._emit(last, None)

    def skip_to(self, frame: int) -> int:
        """Never compute the windows of frames before ``frame`` (rounded down to a hop group).

        For a live caller: frames already shown, whose windows would be thrown away. The frames
        from ``frame`` on come out exactly as without the skip (each group's canvas is cut from
        the audio alone), and the audio only the skipped ones needed is dropped. A thread that
        fell behind catches up in one call instead of computing every late window, which on a
        shared encoder also slows every other stream.

        Returns:
            The frames skipped (0 when ``frame`` is not ahead of the next one to come out).
        """
        frame = self._group(frame)[0]  # a group's canvas starts at the group's first frame
        if self._final is not None or frame <= self.next_frame:
            return 0
        skipped = frame - self.next_frame
        self.next_frame = frame
        self.stats.skipped_frames += skipped
        self._trim()
        return skipped

    def flush(self) -> FeatureChunk | None:
        """End of stream: emit the remaining frames, up to ``floor(seconds × 25)`` in all."""
        if self._final is None:
            self._final = self.received
        return self._emit(num_frames_for(self.received) - 1, self.received // STEP_SAMPLES)

    def pending_samples(self) -> int:
        """Audio held in memory (samples)."""
        return int(self._end - self._off)

    def _append(self, audio: np.ndarray) -> None:
        n = audio.size
        if self._end + n > self._arr.size:  # compact, and grow when more than half is live
            live = self._end - self._off
            size = self._arr.size * 2 if live + n > self._arr.size // 2 else self._arr.size
            while live + n > size:
                size *= 2
            arr = np.zeros(size, np.float32) if size != self._arr.size else self._arr
            arr[:live] = self._arr[self._off : self._end]
            self._arr, self._off, self._end = arr, 0, live
        self._arr[self._end : self._end + n] = audio
        self._end += n
