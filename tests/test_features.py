"""Offline audio features against an independent, step-by-step recomputation."""

import math

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from musetalk_rt.audio import AudioFeatureExtractor, frame_windows, num_frames_for
from musetalk_rt.media import load_audio


def _reference_windows(audio: np.ndarray, whisper, fe) -> torch.Tensor:
    """MuseTalk v1.5's recipe written out literally (30 s segments, float frame maths)."""
    sr = 16000
    feats = []
    for start in range(0, len(audio), 30 * sr):
        mel = fe(
            audio[start : start + 30 * sr], sampling_rate=sr, return_tensors="pt"
        ).input_features
        with torch.no_grad():
            hs = whisper(mel, output_hidden_states=True).hidden_states
        feats.append(torch.stack(hs, dim=2))  # [1, 1500, 5, 384]
    feat = torch.cat(feats, dim=1)
    feat = feat[:, : math.floor(len(audio) / sr * 50)]
    feat = torch.cat([torch.zeros_like(feat[:, :4]), feat, torch.zeros_like(feat[:, :12])], 1)
    n_frames = math.floor(len(audio) / sr * 25)
    clips = [feat[:, math.floor(f * 2.0) : math.floor(f * 2.0) + 10] for f in range(n_frames)]
    windows = torch.cat(clips).reshape(n_frames, 50, 384)
    pe = np.zeros((50, 384))
    pos = np.arange(50)[:, None]
    div = np.exp(np.arange(0, 384, 2) * (-math.log(10000.0) / 384))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos * div), np.cos(pos * div)
    return windows + torch.from_numpy(pe).float()


def test_windows_match_reference_on_real_speech(tiny_models, fixture_file):
    # eng.wav is 60 s: two 30 s segments, so segment joins are exercised too.
    audio = load_audio(fixture_file("eng.wav")).to_mono_16k()
    ours = AudioFeatureExtractor(tiny_models.whisper, tiny_models.feature_extractor).windows(audio)
    ref = _reference_windows(audio, tiny_models.whisper, WhisperFeatureExtractor())
    assert ours.shape == ref.shape == (1500, 50, 384)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_stereo_48k_fixture_gives_200_frames(tiny_models, fixture_file):
    clip = load_audio(fixture_file("yongen.wav"))
    assert clip.sample_rate == 48000 and clip.channels == 2
    audio = clip.to_mono_16k()
    w = AudioFeatureExtractor(tiny_models.whisper, tiny_models.feature_extractor).windows(audio)
    assert w.shape == (200, 50, 384)


def test_window_indexing_and_padding():
    t = 20
    hidden = torch.arange(t, dtype=torch.float32)[:, None, None].expand(t, 5, 384) + 1.0
    w = frame_windows(hidden, num_frames=10) - frame_windows(torch.zeros_like(hidden), 10)
    steps = w[:, ::5, 0]  # [F, 10]: value = step index + 1, 0 for padding
    assert steps[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]  # 4 zero steps in front
    assert steps[3].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # frame f: steps 2f-4..2f+5
    assert steps[9].tolist()[-2:] == [0, 0]  # end padding


def test_frame_count_is_floor_of_seconds_times_25():
    assert num_frames_for(16000 * 60) == 1500
    assert num_frames_for(639) == 0 and num_frames_for(640) == 1
