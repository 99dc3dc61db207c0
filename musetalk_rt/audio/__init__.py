"""Audio to UNet conditioning: whisper features, per-frame windows (offline; streaming later)."""

from musetalk_rt.audio.features import (
    FPS,
    SAMPLE_RATE,
    AudioFeatureExtractor,
    frame_windows,
    num_frames_for,
)

__all__ = ["FPS", "SAMPLE_RATE", "AudioFeatureExtractor", "frame_windows", "num_frames_for"]
