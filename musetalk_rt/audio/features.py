"""Offline audio features exactly as MuseTalk v1.5 computes them.

16 kHz mono audio is cut into 30 s segments; each is turned into an 80-bin log-mel spectrogram
(padded to 30 s) and run through the whisper-tiny encoder, keeping all 5 hidden states
(embeddings + 4 layers) -> ``[T, 5, 384]`` at 50 steps per second, trimmed to
``floor(seconds * 50)``. The sequence is padded with 4 zero steps in front and 12 at the end;
video frame ``f`` (25 fps) takes padded steps ``[2f, 2f + 10)``, i.e. 80 ms of past audio and
80 ms beyond the frame's end. The ``[10, 5, 384]`` window is flattened time-major to ``[50, 384]``
and the sinusoidal positional encoding is added: that is the UNet's ``encoder_hidden_states``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from musetalk_rt.media import FPS, SAMPLE_RATE
from musetalk_rt.modeling import PositionalEncoding

STEPS_PER_SECOND = 50
SEGMENT_S = 30
PAD_LEFT_STEPS = 4
PAD_RIGHT_STEPS = 12
WINDOW_STEPS = 10
HIDDEN_STATES = 5


def num_frames_for(num_samples_16k: int) -> int:
    """Video frames for a clip: ``floor(seconds * 25)`` (exact integer arithmetic)."""
    return (num_samples_16k * FPS) // SAMPLE_RATE


def num_steps_for(num_samples_16k: int) -> int:
    """Whisper steps kept for a clip: ``floor(seconds * 50)``."""
    return (num_samples_16k * STEPS_PER_SECOND) // SAMPLE_RATE


_PE = PositionalEncoding()


def frame_windows(hidden: torch.Tensor, num_frames: int, start_frame: int = 0) -> torch.Tensor:
    """Per-frame conditioning windows from whisper hidden states.

    Args:
        hidden: ``[T, 5, 384]`` hidden states of the whole clip (unpadded).
        num_frames: How many frames to cut.
        start_frame: First frame index.

    Returns:
        ``[F, 50, 384]`` windows with the positional encoding added.
    """
    t, layers, dim = hidden.shape
    pad_l = hidden.new_zeros(PAD_LEFT_STEPS, layers, dim)
    pad_r = hidden.new_zeros(PAD_RIGHT_STEPS, layers, dim)
    padded = torch.cat([pad_l, hidden, pad_r])  # [T + 16, 5, 384]
    frames = torch.arange(start_frame, start_frame + num_frames, device=hidden.device)
    idx = 2 * frames[:, None] + torch.arange(WINDOW_STEPS, device=hidden.device)  # [F, 10]
    if num_frames and int(idx.max()) >= padded.shape[0]:
        raise ValueError(f"frame {start_frame + num_frames - 1} needs audio beyond the clip")
    windows = padded[idx].reshape(num_frames, WINDOW_STEPS * layers, dim)  # [F, 50, 384]
    return _PE(windows)


def whisper_hidden_states(whisper: nn.Module, mel: torch.Tensor) -> torch.Tensor:
    """All 5 hidden states of a whisper encoder for a mel of any even length up to 30 s.

    transformers' ``WhisperEncoder.forward`` accepts only 3000 mel frames; this runs the same
    submodules (convolutions, the first ``T`` positional embeddings, the layers, the final norm)
    on ``T = frames / 2`` steps. At 3000 frames it equals ``output_hidden_states=True``: the
    embeddings, the outputs of layers 1-3, and the normalised output of layer 4.

    Args:
        whisper: transformers ``WhisperEncoder``.
        mel: ``[B, 80, 2T]`` log-mel features.

    Returns:
        ``[B, T, 5, 384]``.
    """
    x = nn.functional.gelu(whisper.conv1(mel))
    x = nn.functional.gelu(whisper.conv2(x)).permute(0, 2, 1)  # [B, T, 384]
    x = x + whisper.embed_positions.weight[: x.shape[1]]
    states = [x]
    for layer in whisper.layers:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out
        states.append(x)
    states[-1] = whisper.layer_norm(x)
    return torch.stack(states, dim=2)  # [B, T, 5, 384]


class AudioFeatureExtractor:
    """Whisper-tiny encoder features for whole clips (the offline path).

    Args:
        whisper: transformers ``WhisperEncoder`` (fp32 reference, on its device).
        feature_extractor: transformers ``WhisperFeatureExtractor``.
        dtype: Compute dtype of the encoder call (the module is not modified).
    """

    def __init__(self, whisper: nn.Module, feature_extractor, dtype: torch.dtype = torch.float32):
        self.whisper = whisper
        self.fe = feature_extractor
        self.device = next(whisper.parameters()).device
        self.dtype = dtype

    def mel(self, audio_16k: np.ndarray) -> torch.Tensor:
        """Log-mel spectrograms of the 30 s segments: ``[S, 80, 3000]`` on the encoder device."""
        seg = SEGMENT_S * SAMPLE_RATE
        segments = [audio_16k[i : i + seg] for i in range(0, max(len(audio_16k), 1), seg)]
        mels = self.fe(segments, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return mels.to(self.device)

    @torch.inference_mode()
    def hidden_states(self, audio_16k: np.ndarray) -> torch.Tensor:
        """All 5 encoder hidden states of a clip, ``[T, 5, 384]``, ``T = floor(seconds * 50)``."""
        mels = self.mel(np.asarray(audio_16k, dtype=np.float32))  # [S, 80, 3000]
        out = self.whisper(mels.to(self.dtype), output_hidden_states=True)
        hidden = torch.stack(out.hidden_states, dim=2)  # [S, 1500, 5, 384]
        hidden = hidden.reshape(-1, *hidden.shape[2:])  # [S * 1500, 5, 384]
        return hidden[: num_steps_for(len(audio_16k))].float()

    def windows(self, audio_16k: np.ndarray) -> torch.Tensor:
        """Conditioning windows of every frame of a clip: ``[F, 50, 384]``."""
        hidden = self.hidden_states(audio_16k)
        return frame_windows(hidden, num_frames_for(len(audio_16k)))
