"""The networks exactly as MuseTalk v1.5 defines them.

Nothing in this package accelerates anything: it is the fp32 reference that every engine in
``musetalk_rt.engines`` transforms and is checked against. Shapes are per frame unless a batch
dimension ``B`` is shown.
"""

from musetalk_rt.modeling.configs import (
    LATENT_SCALE,
    UNET_CONFIG,
    UNET_TINY_CONFIG,
    VAE_CONFIG,
    VAE_TINY_CONFIG,
    WHISPER_TINY_CONFIG,
)
from musetalk_rt.modeling.networks import (
    PositionalEncoding,
    UNetStep,
    VaeDecodeStep,
    VaeEncoder,
    build_unet,
    build_vae,
    build_whisper_encoder,
)

__all__ = [
    "LATENT_SCALE",
    "UNET_CONFIG",
    "UNET_TINY_CONFIG",
    "VAE_CONFIG",
    "VAE_TINY_CONFIG",
    "WHISPER_TINY_CONFIG",
    "PositionalEncoding",
    "UNetStep",
    "VaeDecodeStep",
    "VaeEncoder",
    "build_unet",
    "build_vae",
    "build_whisper_encoder",
]
