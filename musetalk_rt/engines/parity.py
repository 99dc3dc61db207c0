"""Quality gate: compare any engine with the fp32 eager reference on the same fresh inputs.

Two numbers per check: the relative L2 error of the UNet's output latents, and the PSNR of the
decoded uint8 faces (what the audience sees). PSNR of identical frames is reported as 100 dB.
A candidate whose latents or decoded faces hold a NaN or an infinity fails whatever its PSNR.
The reference runs in IEEE fp32 (:func:`ieee_fp32`): torch lets cuDNN's convolutions use TF32
by default, which would make the reference itself a 10-bit-mantissa approximation on a GPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

PSNR_GATE_DB = 40.0
PSNR_IDENTICAL_DB = 100.0


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives NaN)."""
    ref64, out64 = ref.double(), out.double()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def psnr_u8(ref: torch.Tensor, out: torch.Tensor) -> float:
    """PSNR in dB of two uint8 images/batches (100 dB when identical)."""
    mse = float((ref.double() - out.double()).pow(2).mean())
    if mse == 0.0:
        return PSNR_IDENTICAL_DB
    return 10.0 * math.log10(255.0**2 / mse)


@contextlib.contextmanager
def ieee_fp32():
    """Full fp32 maths inside: no TF32 in cuDNN convolutions or cuBLAS matmuls.

    The flags are process-wide and restored on exit; on a CPU they change nothing.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class ParityResult:
    """One engine-vs-reference comparison."""

    latent_rel_err: float
    psnr_db: float
    batch: int
    passed: bool
    finite: bool = True  # the candidate's latents and decoded faces hold no NaN or infinity

    def as_dict(self) -> dict:
        return asdict(self)


def check_parity(
    ref_unet,
    ref_vae,
    unet,
    vae,
    batch: int,
    device,
    seed: int = 1234,
    gate_db: float = PSNR_GATE_DB,
) -> ParityResult:
    """Run reference and candidate stage runners on the same fresh random inputs.

    Args:
        ref_unet: fp32 eager UNet runner (callable ``(latents, audio) -> latents``).
        ref_vae: fp32 eager VAE-decode runner.
        unet: Candidate UNet runner.
        vae: Candidate VAE-decode runner.
        batch: Batch size.
        device: Device of the inputs.
        seed: Seed of the fresh inputs.
        gate_db: PSNR threshold of ``passed``.
    """
    from musetalk_rt.stages.to_host import images_to_uint8

    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 8, 32, 32, generator=g).to(device)
    audio = torch.randn(batch, 50, 384, generator=g).to(device)
    with torch.inference_mode():
        with ieee_fp32():
            ref_lat = ref_unet(latents, audio).float().clone()
            ref_img = images_to_uint8(ref_vae(ref_lat)).clone()
        lat = unet(latents, audio).float().clone()
        decoded = vae(lat)  # [B, 3, 256, 256]
        # NaN pixels (an fp16 VAE's overflow) turn into 0 in uint8 and a few of them barely
        # move the PSNR: the gate checks the decoded values themselves too
        finite = bool(torch.isfinite(lat).all()) and bool(torch.isfinite(decoded).all())
        img = images_to_uint8(decoded).clone()
    err = relative_error(ref_lat, lat)
    psnr = psnr_u8(ref_img, img)
    ok = finite and math.isfinite(err) and psnr >= gate_db
    return ParityResult(round(err, 6), round(psnr, 2), batch, ok, finite)
