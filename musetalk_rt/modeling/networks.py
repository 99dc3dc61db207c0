"""MuseTalk v1.5's networks and the per-frame maths around them.

- :class:`UNetStep`: one UNet call at timestep 0 (MuseTalk uses no scheduler).
- :class:`VaeDecodeStep`: latents / 0.18215 -> VAE decoder -> image in about [-1, 1].
- :class:`VaeEncoder`: a 256x256 face crop -> the 8-channel UNet input latent
  (masked-reference latent, reference latent), as MuseTalk prepares its avatars.
- :class:`PositionalEncoding`: the sinusoidal encoding added to the audio tokens.

These modules are the fp32 reference: engines transform copies of them, never edit them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from musetalk_rt.modeling.configs import AUDIO_DIM, FACE_SIZE, LATENT_SCALE


def build_unet(config: dict) -> nn.Module:
    """Build a ``diffusers.UNet2DConditionModel`` from a MuseTalk ``musetalk.json`` config.

    Args:
        config: The UNet config (keys starting with ``_`` are ignored).

    Returns:
        The randomly initialised UNet (seed with ``torch.manual_seed`` before calling).
    """
    from diffusers import UNet2DConditionModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs).eval().requires_grad_(False)


def build_vae(config: dict) -> nn.Module:
    """Build a ``diffusers.AutoencoderKL`` (sd-vae-ft-mse layout) from its config."""
    from diffusers import AutoencoderKL

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return AutoencoderKL(**kwargs).eval().requires_grad_(False)


def build_whisper_encoder(config: dict) -> nn.Module:
    """Build the encoder of a whisper model (transformers' ``WhisperEncoder``)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    return WhisperEncoder(cfg).eval().requires_grad_(False)


class PositionalEncoding(nn.Module):
    """Sinusoidal positional encoding added to the 50 audio tokens of each frame.

    ``pe[p, 2i] = sin(p / 10000^(2i/d))`` and ``pe[p, 2i+1] = cos(p / 10000^(2i/d))``.

    Args:
        d_model: Token width (384 for whisper-tiny).
        max_len: Longest sequence supported.
    """

    def __init__(self, d_model: int = AUDIO_DIM, max_len: int = 5000):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # [L, 1]
        inv_freq = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
        )  # [d/2]
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq)
        self.register_buffer("pe", pe, persistent=False)  # [L, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Add the encoding: ``x`` is ``[B, T, d]``."""
        return x + self.pe[: x.shape[1]].to(dtype=x.dtype, device=x.device)


class UNetStep(nn.Module):
    """One MuseTalk UNet call: ``unet(latents, t=0, audio).sample``.

    Inputs ``latents`` ``[B, 8, 32, 32]`` and ``audio`` ``[B, 50, 384]``; output ``[B, 4, 32, 32]``.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        # On the UNet's device: a CPU timestep would be copied to the GPU on every call (and
        # cannot be captured in a CUDA graph).
        device = next(unet.parameters()).device
        self.register_buffer(
            "timestep", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )

    def forward(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, self.timestep, encoder_hidden_states=audio, return_dict=False)[0]


class VaeDecodeStep(nn.Module):
    """MuseTalk's latent decode: ``vae.decode(latents / 0.18215).sample``.

    Input ``[B, 4, 32, 32]``; output ``[B, 3, 256, 256]`` in about [-1, 1] (``to_host`` maps it to
    uint8 with ``(x / 2 + 0.5).clamp(0, 1) * 255``, rounded).
    """

    def __init__(self, vae: nn.Module, scale: float = LATENT_SCALE):
        super().__init__()
        self.vae = vae
        self.scale = scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """Face crops -> the 8-channel UNet input latent of MuseTalk's avatar preparation.

    The masked reference is the crop scaled to [0, 1] with rows ``FACE_SIZE // 2`` and below set
    to 0; both it and the unmasked crop are normalised to [-1, 1], encoded, *sampled* from the
    latent distribution (as MuseTalk does) and scaled by 0.18215, then concatenated
    (masked first).
    """

    def __init__(self, vae: nn.Module, scale: float = LATENT_SCALE):
        super().__init__()
        self.vae = vae
        self.scale = scale

    def forward(self, faces_u8: torch.Tensor, generator: torch.Generator | None = None):
        """Encode ``faces_u8`` ``[B, 256, 256, 3]`` uint8 RGB to ``[B, 8, 32, 32]`` latents."""
        dtype = next(self.vae.parameters()).dtype
        x = faces_u8.permute(0, 3, 1, 2).to(dtype) / 255.0  # [B, 3, 256, 256] in [0, 1]
        masked = x.clone()
        masked[:, :, FACE_SIZE // 2 :, :] = 0
        out = []
        for img in (masked, x):
            dist = self.vae.encode(img * 2.0 - 1.0).latent_dist
            out.append(dist.sample(generator=generator) * self.scale)  # [B, 4, 32, 32]
        return torch.cat(out, dim=1)  # [B, 8, 32, 32]
