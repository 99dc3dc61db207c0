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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from musetalk_rt.audio.features import SAMPLE_RATE
from musetalk_rt.errors import UserError

WINDOW_SAMPLES = 512  # 32 ms at 16 kHz
CONTEXT_SAMPLES = 64  # the model sees the previous window's last 64 samples too
WINDOW_MS = WINDOW_SAMPLES * 1000 // SAMPLE_RATE


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


def load_silero_vad() -> SileroVadNet:
    """The silero-vad network with the package's weights (safetensors; no pickles)."""
    from safetensors.torch import load_file

    net = SileroVadNet()
    net.load_state_dict(load_file(str(silero_weights_path())))
    return net.eval().requires_grad_(False)


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


class VoiceActivity:
    """Streaming VAD: push 16 kHz audio, read speech segments as they are decided.

    Args:
        net: The silero-vad network (shared between streams; it holds no state).
        config: Thresholds and hysteresis.
    """

    def __init__(self, net: SileroVadNet, config: VadConfig | None = None):
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

    @property
    def decided_ms(self) -> float:
        """Audio time up to which decisions are final (older windows cannot change)."""
        return self._windows * WINDOW_MS - max(self.config.min_speech_ms, self.config.hangover_ms)

    @property
    def speaking(self) -> bool:
        return self._speaking

    def push(self, audio_16k: np.ndarray) -> None:
        """Analyse new audio (any length; whole 32 ms windows are processed)."""
        self._pending = np.concatenate([self._pending, np.asarray(audio_16k, np.float32)])
        n = self._pending.size // WINDOW_SAMPLES
        if n == 0:
            return
        block = self._pending[: n * WINDOW_SAMPLES].reshape(n, WINDOW_SAMPLES)  # [n, 512]
        self._pending = self._pending[n * WINDOW_SAMPLES :]
        # each window with the previous one's last 64 samples: [n, 576]
        context = np.concatenate([self._context[None], block[:-1, -CONTEXT_SAMPLES:]])
        x = torch.from_numpy(np.concatenate([context, block], axis=1))
        with torch.inference_mode():
            # the front-end of all n windows in one call (few torch calls per push, not per
            # window: each call releases and retakes the interpreter lock that many channels'
            # threads share); only the LSTM state chains windows one at a time
            feats = self.net.features(x)  # [n, 128]
            probs = []
            for i in range(n):
                prob, self._state = self.net.step(feats[i : i + 1], self._state)
                probs.append(prob)
            probs = torch.cat(probs).tolist()
        self._context = block[-1, -CONTEXT_SAMPLES:].copy()
        for p in probs:
            self._decide(p)

    def _decide(self, prob: float) -> None:
        cfg = self.config
        t_ms = self._windows * WINDOW_MS  # start of this window
        self._windows += 1
        if self.keep_probs:
            self.probs.append(prob)
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
