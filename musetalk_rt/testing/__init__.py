"""Test helpers shipped with the package (used by our tests, the demo and notebooks).

- :func:`write_tiny_layout`: a complete ``models/`` layout in the *real* file format but with the
  tiny configs, so the real loading code runs without downloading anything.
- :func:`speech_wav`: speak a sentence with ``espeak-ng`` when present, else synthesise a
  fixture-free voiced signal (a glottal-like pulse train through vowel formants).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import torch

from musetalk_rt.modeling import (
    UNET_TINY_CONFIG,
    VAE_TINY_CONFIG,
    WHISPER_TINY_CONFIG,
    build_unet,
    build_vae,
    build_whisper_encoder,
)


def write_tiny_layout(
    models_dir: str | Path, seed: int = 0, legacy_vae_keys: bool = False, vae_bin: bool = False
) -> Path:
    """Write the weights layout of ``models/README.md`` with tiny random networks.

    Args:
        models_dir: Target folder.
        seed: Weight seed.
        legacy_vae_keys: Save the VAE with the attention key names of early diffusers versions.
        vae_bin: Save the VAE as ``diffusion_pytorch_model.bin`` instead of safetensors.

    Returns:
        ``models_dir``.
    """
    from safetensors.torch import save_file

    root = Path(models_dir)
    torch.manual_seed(seed)
    (root / "musetalkV15").mkdir(parents=True, exist_ok=True)
    (root / "musetalkV15" / "musetalk.json").write_text(json.dumps(UNET_TINY_CONFIG))
    torch.save(build_unet(UNET_TINY_CONFIG).state_dict(), root / "musetalkV15" / "unet.pth")

    (root / "sd-vae").mkdir(exist_ok=True)
    (root / "sd-vae" / "config.json").write_text(json.dumps(VAE_TINY_CONFIG))
    sd = build_vae(VAE_TINY_CONFIG).state_dict()
    if legacy_vae_keys:
        from musetalk_rt.weights import LEGACY_VAE_ATTENTION_KEYS

        back = {new: old for old, new in LEGACY_VAE_ATTENTION_KEYS.items()}
        renamed = {}
        for k, v in sd.items():
            for new, old in back.items():
                k = k.replace(new, old)
            renamed[k] = v
        sd = renamed
    if vae_bin:
        torch.save(sd, root / "sd-vae" / "diffusion_pytorch_model.bin")
    else:
        save_file(
            {k: v.contiguous() for k, v in sd.items()},
            str(root / "sd-vae" / "diffusion_pytorch_model.safetensors"),
        )

    (root / "whisper").mkdir(exist_ok=True)
    (root / "whisper" / "config.json").write_text(json.dumps(WHISPER_TINY_CONFIG))
    enc = build_whisper_encoder(WHISPER_TINY_CONFIG).state_dict()
    # Checkpoints of WhisperForConditionalGeneration prefix the encoder with "model.encoder.".
    torch.save(
        {f"model.encoder.{k}": v for k, v in enc.items()}, root / "whisper" / "pytorch_model.bin"
    )
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor().save_pretrained(str(root / "whisper"))
    return root


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def synthetic_voice(duration_s: float = 3.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A voiced, speech-like signal: pulse train at ~120 Hz through moving vowel formants."""
    rng = np.random.default_rng(seed)
    n = int(duration_s * sample_rate)
    t = np.arange(n) / sample_rate
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(f0 / sample_rate)
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float32)  # glottal pulses
    out = np.zeros(n, np.float32)
    for f1, f2 in ((700, 1200), (300, 2300), (500, 900)):  # a, i, o formants
        for fc in (f1, f2):
            k = np.exp(-t[:400] * 300) * np.sin(2 * np.pi * fc * t[:400])  # formant ringing
            out += np.convolve(source, k, mode="same").astype(np.float32) / 3
    syllables = (np.sin(2 * np.pi * 3.0 * t) > -0.3).astype(np.float32)  # ~3 syllables/s
    out = out * syllables + 0.002 * rng.standard_normal(n).astype(np.float32)
    return 0.5 * out / max(1e-6, float(np.abs(out).max()))


def speech_wav(
    path: str | Path,
    text: str = "Hello, I am your avatar. Welcome to the show.",
) -> tuple[Path, str]:
    """Write speech to ``path``: espeak-ng if installed, else :func:`synthetic_voice`.

    Returns:
        The path and which source was used (``espeak-ng`` or ``synthetic voice``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("espeak-ng")
    if exe:
        res = subprocess.run([exe, "-w", str(path), text], capture_output=True, timeout=60)
        if res.returncode == 0 and path.is_file() and path.stat().st_size > 44:
            return path, "espeak-ng"
    _write_wav(path, synthetic_voice(), 16000)
    return path, "synthetic voice"
