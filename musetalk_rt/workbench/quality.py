"""An engine's decoded faces beside the fp32 eager reference, and their difference.

The numbers are the quality gate's (``engines.parity``: PSNR of the uint8 faces, relative error
of the UNet's latents); the pictures show *where* an engine differs. With synthetic weights the
faces are noise and only the difference means something; with the real weights both do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from musetalk_rt.engines.parity import psnr_u8, relative_error


@dataclass
class FaceComparison:
    """Reference and engine faces for the same inputs.

    Attributes:
        engine: ``engine/dtype``.
        reference: ``[B, 256, 256, 3]`` uint8, fp32 eager.
        faces: ``[B, 256, 256, 3]`` uint8, the engine's.
        psnr_db: PSNR of ``faces`` against ``reference``.
        latent_rel_err: Relative L2 error of the UNet's output latents.
    """

    engine: str
    reference: np.ndarray
    faces: np.ndarray
    psnr_db: float
    latent_rel_err: float

    @property
    def abs_diff(self) -> np.ndarray:
        """``[B, 256, 256]`` per-pixel largest absolute channel difference, uint8."""
        d = np.abs(self.reference.astype(np.int16) - self.faces.astype(np.int16))
        return d.max(axis=-1).astype(np.uint8)


def compare_faces(
    models,
    avatar,
    unet_run,
    vae_run,
    label: str,
    batch: int = 4,
    seed: int = 7,
) -> FaceComparison:
    """Decode ``batch`` frames of ``avatar`` with an engine's stages and with fp32 eager.

    Args:
        models: Loaded reference models.
        avatar: A loaded avatar (its first ``batch`` cycle frames' latents are the input).
        unet_run: The engine's UNet runner, ``(latents, audio) -> latents``.
        vae_run: Its VAE-decode runner, ``latents -> images``.
        label: ``engine/dtype``, for titles.
        batch: Frames compared (a bucket the engine was built for).
        seed: Seed of the audio conditioning.
    """
    from musetalk_rt.stages.model_stages import reference_stages
    from musetalk_rt.stages.to_host import images_to_uint8

    device = models.device
    ids = [i % len(avatar.frames) for i in range(batch)]
    latents = avatar.latents[ids].to(device)  # [B, 8, 32, 32]
    g = torch.Generator().manual_seed(seed)
    audio = torch.randn(batch, 50, 384, generator=g).to(device)  # [B, 50, 384]
    ref_unet, ref_vae = reference_stages(models, [batch])
    with torch.inference_mode():
        ref_lat = ref_unet.run(latents, audio).float().clone()
        ref = images_to_uint8(ref_vae.run(ref_lat)).cpu()
        lat = unet_run(latents, audio).float().clone()
        out = images_to_uint8(vae_run(lat)).cpu()
    return FaceComparison(
        engine=label,
        reference=ref.numpy(),
        faces=out.numpy(),
        psnr_db=round(psnr_u8(ref, out), 2),
        latent_rel_err=round(relative_error(ref_lat, lat), 6),
    )
