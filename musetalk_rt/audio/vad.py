"""Voice activity: silero-vad on 32 ms windows, with hysteresis, driving speech/idle switching.

The network is silero-vad's 16 kHz model; its weights ship inside the ``silero-vad`` PyPI
package. We run it as a small PyTorch module of our own (STFT as a convolution, four
convolutions, an LSTM cell, a sigmoid head) loaded from the package's safetensors checkpoint
(``silero_vad_16k.safetensors``), rather than its TorchScript file: no TorchScript or pickle
loading in production, and no import of the package (which sets torch's global thread count to 1
on import). A test loads the package's TorchScript model, copies its weights into this module and
gets identical probabilities, which checks the architecture; the safetensors checkpoint is a
slightly different training snapshot (98.5% of 32 ms windows on ``eng.wav`` get the same
speech/non-speech call at 0.5).

:class:`VoiceActivity` turns per-window probabilities into speech segments with hysteresis: a
segment starts after ``min_speech_ms`` of windows at or above ``threshold`` and ends after
``hangover_ms`` below ``threshold - 0.15`` (its end moved back by the model's measured lag).
Its decision delay (how long after the audio a
decision is known) is at most ``min_speech_ms + 32`` ms at a start and ``hangover_ms + 32`` ms at
an end. :class:`SpeechGate` maps frames to a talk weight in [0, 1] with short cross-fades, so
the mouth is closed in silence and the GPU rests.
"""

from __future__ import annotations

import importlib.util
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from musetalk_rt.audio.features import SAMPLE_RATE
from musetalk_rt.errors import UserError

WINDOW_SAMPLES = 512  # 32 ms at 16 kHz
CONTEXT_SAMPLES = 64  # the model sees the previous window's last 64 samples too
WINDOW_MS = WINDOW_SAMPLES * 1000 // SAMPLE_RATE
VadState = tuple[torch.Tensor, torch.Tensor] | None  # the LSTM's (h, c), each [1, 128]


def silero_weights_path() -> Path:
    """The 16 kHz safetensors file inside the installed ``silero-vad`` package (not imported)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("voice activity needs the package silero-vad (pip install silero-vad)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad_16k.safetensors"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall silero-vad (pip install -U silero-vad)")
    return path


class SileroVadNet(nn.Module):
    """silero-vad v5 (16 kHz): ``[B, 576]`` audio + state -> speech probability ``[B]``."""

    def __init__(self):
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, kernel_size=256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x`` ``[B, 64 + 512]`` (context + window) -> probability ``[B]``, new ``(h, c)``."""
        return self.step(self.features(x), state)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stateless front-end: ``[B, 576]`` windows -> ``[B, 128]`` (batch them freely)."""
        x = nn.functional.pad(x, (0, 64), mode="reflect").unsqueeze(1)  # [B, 1, 640]
        spec = self.stft_conv(x)  # [B, 258, 4]: real and imaginary parts
        mag = (spec[:, :129] ** 2 + spec[:, 129:] ** 2).sqrt()  # [B, 129, 4]
        h = torch.relu(self.conv1(mag))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return torch.relu(self.conv4(h)).squeeze(-1)  # [B, 128]

    def step(
        self, h: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The recurrent part: features ``[B, 128]`` + state -> probability ``[B]``, state."""
        hx, cx = self.lstm_cell(h, state)
        prob = torch.sigmoid(self.final_conv(torch.relu(hx).unsqueeze(-1)))  # [B, 1, 1]
        return prob[:, 0, 0], (hx, cx)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, state: VadState) -> tuple[list[float], VadState]:
        """One stream's consecutive windows ``[n, 576]`` -> n probabilities and its new state.

        Two steps whatever n (few torch calls per push, not per window: each releases and
        retakes the interpreter lock that many channels' threads share).
        """
        probs, states = self.recur([self.features(x)], [state])
        return probs[0], states[0]

    @torch.inference_mode()
    def recur(
        self, feats: list[torch.Tensor], states: list[VadState]
    ) -> tuple[list[list[float]], list[VadState]]:
        """The recurrent part for several streams at once, each over its own windows.

        Args:
            feats: Per stream, its consecutive windows' features ``[n_i, 128]`` (n_i >= 1).
            states: Per stream, its state before them.

        Returns:
            Per stream its n_i probabilities, and its state after them.

        One sequence LSTM call over all streams (packed: each stream stops at its own last
        window) with the cell's weights, instead of one cell step per window; the same numbers
        to ~1e-6.
        """
        lstm = self.__dict__.get("_seq_lstm")
        # made once, after the weights were loaded, on the CPU where the VAD runs (not a
        # registered module: load weights or move the network before its first run)
        if lstm is None:
            cell = self.lstm_cell
            lstm = nn.LSTM(cell.input_size, cell.hidden_size).eval().requires_grad_(False)
            for ours, theirs in (("ih", "ih_l0"), ("hh", "hh_l0")):
                getattr(lstm, f"weight_{theirs}").copy_(getattr(cell, f"weight_{ours}"))
                getattr(lstm, f"bias_{theirs}").copy_(getattr(cell, f"bias_{ours}"))
            self.__dict__["_seq_lstm"] = lstm
        counts = [f.shape[0] for f in feats]
        zeros = feats[0].new_zeros(1, self.lstm_cell.hidden_size)
        h0 = torch.cat([zeros if s is None else s[0] for s in states]).unsqueeze(0)  # [1, B, 128]
        c0 = torch.cat([zeros if s is None else s[1] for s in states]).unsqueeze(0)
        if len(feats) == 1:
            out, (hn, cn) = lstm(feats[0].unsqueeze(1), (h0, c0))  # [n, 1, 128]
        else:
            seq = pack_padded_sequence(pad_sequence(feats), counts, enforce_sorted=False)
            out, (hn, cn) = lstm(seq, (h0, c0))
            out, _ = pad_packed_sequence(out)  # [T, B, 128]
        prob = torch.sigmoid(self.final_conv(torch.relu(out).permute(1, 2, 0)))  # [B, 1, T]
        rows = prob[:, 0, :].tolist()
        return (
            [row[:n] for row, n in zip(rows, counts, strict=True)],
            [(hn[0, i : i + 1], cn[0, i : i + 1]) for i in range(len(feats))],
        )


def load_silero_vad() -> SileroVadNet:
    """The silero-vad network with the package's weights (safetensors; no pickles)."""
    from safetensors.torch import load_file

    net = SileroVadNet()
    net.load_state_dict(load_file(str(silero_weights_path())))
    return net.eval().requires_grad_(False)


class VadBatcher:
    """One thread that runs the network for many streams, their windows in one batch.

    A drop-in for the network in :class:`VoiceActivity` (the same :meth:`run`): each stream's
    thread hands over its windows and state and waits for its probabilities; the batcher takes
    what arrives within ``gather_s`` of the first request and runs the front-end of all of it in
    one call and the LSTM over all of it in another (:meth:`SileroVadNet.recur`). On an H200
    host with 16 live channels, one network per channel thread cost 7.4 CPU-seconds per channel in
    135 s, each of the ~20 small torch calls per window releasing and retaking the interpreter
    lock that the GPU worker needs too; batched, a window costs a fraction of those calls.
    The probabilities equal one-stream runs (tested to 1e-5). Batch sizes are padded to powers
    of two and those shapes are run once at construction: the CPU convolutions' first call at a
    new shape costs a few ms, which on a 2-core CPU at 12 channels made late windows in the
    first seconds.

    Overflow policy: none needed — each caller waits for its own answer, so at most one request
    per stream is queued. A failed batch is retried request by request, so a bad request fails
    its own caller only. A caller that waits longer than ``wait_s`` (a stalled batcher) runs the
    network on its own thread; so does every call after :meth:`close`.

    Args:
        net: The silero-vad network.
        gather_s: How long after a request the batch waits for the other streams' requests.
        streams: How many streams use it: a batch with that many requests runs at once.
        wait_s: The longest a caller waits for its answer before computing it itself.
    """

    def __init__(
        self,
        net: SileroVadNet,
        gather_s: float = 0.01,
        streams: int | None = None,
        wait_s: float = 2.0,
    ):
        self.net = net
        self.gather_s = gather_s
        self.streams = streams
        self.wait_s = wait_s
        self.timeouts = 0  # callers that gave up waiting and ran the network themselves
        self.calls = 0  # batched network calls
        self.requests = 0  # requests served in them
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._warm(4 * (streams or 1))

    @torch.inference_mode()
    def _warm(self, max_windows: int) -> None:
        """Run the front-end at every padded batch size up to ``max_windows`` windows once."""
        p = 1
        while p <= _pow2(max_windows):
            self.net.features(torch.zeros(p, CONTEXT_SAMPLES + WINDOW_SAMPLES))
            p *= 2

    def run(self, x: torch.Tensor, state: VadState) -> tuple[list[float], VadState]:
        """Like :meth:`SileroVadNet.run`, batched with the other streams' calls."""
        if x.shape[0] == 0:
            return [], state
        fut: Future = Future()
        with self._lock:
            if self._closed:
                return self.net.run(x, state)
            if self._thread is None:
                thread = threading.Thread(target=self._loop, name="vad batcher", daemon=True)
                thread.start()  # kept only once running: a failed start is retried next call
                self._thread = thread
            self._q.put((x, state, fut))
        try:
            return fut.result(timeout=self.wait_s)
        except FutureTimeout:  # the batcher stalled: never hold a channel's audio path on it
            self.timeouts += 1
            return self.net.run(x, state)

    def close(self, timeout_s: float = 5.0) -> None:
        """Serve what is queued, stop the thread; later calls run on their own thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(None)
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch, last = [item], False
            end = time.monotonic() + self.gather_s
            full = self.streams or 0
            while len(batch) != full and (remaining := end - time.monotonic()) > 0:
                try:
                    item = self._q.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    last = True
                    break
                batch.append(item)
            self._serve(batch)
            if last:
                return

    @torch.inference_mode()
    def _serve(self, batch: list) -> None:
        try:
            counts = [x.shape[0] for x, _, _ in batch]
            total = sum(counts)
            pad = _pow2(total) - total  # padded rows: few shapes, each one seen at start-up
            x = torch.cat(
                [x for x, _, _ in batch]
                + [batch[0][0].new_zeros(pad, CONTEXT_SAMPLES + WINDOW_SAMPLES)] * (pad > 0)
            )
            feats = self.net.features(x)[:total].split(counts)  # per stream [n_i, 128]
            probs, states = self.net.recur(list(feats), [s for _, s, _ in batch])
            self.calls += 1
            self.requests += len(batch)
        except Exception:  # one by one: a bad request fails its own caller, not the others
            for x, st, fut in batch:
                try:
                    fut.set_result(self.net.run(x, st))
                except Exception as exc:
                    fut.set_exception(exc)
            return
        for (_, _, fut), p, st in zip(batch, probs, states, strict=True):
            fut.set_result((p, st))


@dataclass
class VadConfig:
    """Hysteresis of :class:`VoiceActivity` (times in ms, multiples of 32 are exact)."""

    threshold: float = 0.5
    min_speech_ms: int = 64
    hangover_ms: int = 160
    pad_ms: int = 0  # added before a segment's start and after its end
    # silero's probability falls about two windows after the sound stops (segment ends measured
    # 40-110 ms late on espeak-ng sentences); the end border is moved back by this much
    end_lag_ms: int = 64

    @property
    def off_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01)

    @property
    def decision_delay_ms(self) -> int:
        """Worst-case delay of a speech-start decision after the audio that causes it."""
        return self.min_speech_ms + WINDOW_MS


@dataclass
class Segment:
    """Speech from ``start_ms`` to ``end_ms`` (``end_ms`` None while still open)."""

    start_ms: float
    end_ms: float | None = None


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << max(0, n - 1).bit_length()


class VoiceActivity:
    """Streaming VAD: push 16 kHz audio, read speech segments as they are decided.

    Args:
        net: The silero-vad network (shared between streams; it holds no state), or a
            :class:`VadBatcher` that runs it for many streams at once.
        config: Thresholds and hysteresis.
    """

    def __init__(self, net: SileroVadNet | VadBatcher, config: VadConfig | None = None):
        self.net = net
        self.config = config or VadConfig()
        self.segments: list[Segment] = []
        self.probs: list[float] = []  # one per 32 ms window (kept for reports; 31 floats/s)
        self.keep_probs = True
        self._pending = np.zeros(0, np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)
        self._state = None
        self._windows = 0
        self._run_on = 0  # consecutive windows at/above threshold while silent
        self._run_off = 0  # consecutive windows below the off threshold while speaking
        self._speaking = False
        self._quiet = 0  # consecutive windows below the off threshold (any state)

    @property
    def quiet_ms(self) -> float:
        """How long the newest windows have been below the off threshold (0 while speaking)."""
        return 0.0 if self._speaking else self._quiet * WINDOW_MS

    @property
    def decided_ms(self) -> float:
        """Audio time up to which decisions are final (older windows cannot change)."""
        return self._windows * WINDOW_MS - max(self.config.min_speech_ms, self.config.hangover_ms)

    @property
    def speaking(self) -> bool:
        return self._speaking

    def push(self, audio_16k: np.ndarray) -> None:
        """Analyse new audio (any length; whole 32 ms windows are processed).

        Raises:
            Exception: The network's error; those windows were counted as silence first, so
                the stream's timeline stays aligned and the next push works as before.
        """
        self._pending = np.concatenate([self._pending, np.asarray(audio_16k, np.float32)])
        n = self._pending.size // WINDOW_SAMPLES
        if n == 0:
            return
        block = self._pending[: n * WINDOW_SAMPLES].reshape(n, WINDOW_SAMPLES)  # [n, 512]
        self._pending = self._pending[n * WINDOW_SAMPLES :]
        # each window with the previous one's last 64 samples: [n, 576]
        context = np.concatenate([self._context[None], block[:-1, -CONTEXT_SAMPLES:]])
        x = torch.from_numpy(np.concatenate([context, block], axis=1))
        self._context = block[-1, -CONTEXT_SAMPLES:].copy()
        try:
            probs, self._state = self.net.run(x, self._state)
        except Exception:  # the windows count as silence, so later ones keep their times
            for _ in range(n):
                self._decide(0.0)
            raise
        for p in probs:
            self._decide(p)

    def _decide(self, prob: float) -> None:
        cfg = self.config
        t_ms = self._windows * WINDOW_MS  # start of this window
        self._windows += 1
        if self.keep_probs:
            self.probs.append(prob)
        self._quiet = self._quiet + 1 if prob < cfg.off_threshold else 0
        if not self._speaking:
            self._run_on = self._run_on + 1 if prob >= cfg.threshold else 0
            if self._run_on * WINDOW_MS >= cfg.min_speech_ms:
                start = t_ms - (self._run_on - 1) * WINDOW_MS - cfg.pad_ms
                prev_end = self.segments[-1].end_ms if self.segments else None
                if prev_end is not None and start <= prev_end:
                    self.segments[-1].end_ms = None  # re-open: the gap was shorter than the pads
                else:
                    self.segments.append(Segment(max(0.0, start)))
                self._speaking, self._run_off = True, 0
        else:
            self._run_off = self._run_off + 1 if prob < cfg.off_threshold else 0
            if self._run_off * WINDOW_MS >= cfg.hangover_ms:
                end = t_ms - (self._run_off - 1) * WINDOW_MS - cfg.end_lag_ms + cfg.pad_ms
                self.segments[-1].end_ms = max(end, self.segments[-1].start_ms + WINDOW_MS)
                self._speaking, self._run_on = False, 0

    def finish(self) -> list[Segment]:
        """End of stream: close an open segment; return all segments."""
        if self._speaking and self.segments:
            self.segments[-1].end_ms = self._windows * WINDOW_MS
            self._speaking = False
        return self.segments

    def is_speech(self, t_ms: float) -> bool:
        """Whether time ``t_ms`` lies in a speech segment, as decided so far."""
        for seg in reversed(self.segments):
            if seg.start_ms <= t_ms and (seg.end_ms is None or t_ms < seg.end_ms):
                return True
            if seg.end_ms is not None and seg.end_ms <= t_ms:
                break
        return False


class SpeechGate:
    """Per-frame talk weight: 1 shows the generated face, 0 the idle cycle, with cross-fades.

    Args:
        crossfade_frames: Frames over which the weight ramps at each switch (0 = hard cut).
    """

    def __init__(self, crossfade_frames: int = 3):
        self.crossfade_frames = crossfade_frames
        self._weight = 0.0

    def step(self, speech: bool) -> float:
        """Advance one frame; return its weight."""
        target = 1.0 if speech else 0.0
        if self.crossfade_frames <= 0:
            self._weight = target
        elif self._weight < target:
            self._weight = min(target, self._weight + 1.0 / self.crossfade_frames)
        elif self._weight > target:
            self._weight = max(target, self._weight - 1.0 / self.crossfade_frames)
        return self._weight
