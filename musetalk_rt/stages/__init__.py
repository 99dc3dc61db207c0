"""Stages: the steps every frame goes through, shared by offline render and live.

``unet`` -> ``vae_decode`` -> ``to_host`` -> ``blend``. Each stage has a stable name, a shape
spec as a function of the batch size, ``prepare(batch_sizes)`` for all one-off work (returning
the engine report), and a call that takes and returns a :class:`FrameBatch`. Stages keep data on
the device; only ``to_host`` copies to the CPU (and is the only one that synchronises).
"""

from musetalk_rt.stages.base import FrameBatch, Stage, StageClock
from musetalk_rt.stages.blend import BlendStage, crossfade
from musetalk_rt.stages.model_stages import UNetStage, VaeDecodeStage, reference_stages
from musetalk_rt.stages.to_host import ToHostStage, images_to_uint8

__all__ = [
    "BlendStage",
    "FrameBatch",
    "Stage",
    "StageClock",
    "ToHostStage",
    "UNetStage",
    "VaeDecodeStage",
    "crossfade",
    "images_to_uint8",
    "reference_stages",
]
