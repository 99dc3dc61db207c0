"""The eager engine: the reference module (fp32) or a cast copy of it (fp16/bf16)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from musetalk_rt.engines.base import Engine, EngineReport, Runner, dtype_name, register


@register
class EagerEngine(Engine):
    """Plain PyTorch. fp32 is the reference itself; other dtypes use a cast copy."""

    name = "eager"
    description = "plain PyTorch (the fp32 reference or a cast copy)"

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type == "cpu" and dtype == torch.float16:
            return "fp16 convolutions are not supported well on CPU; use --dtype fp32 or bf16"
        return None

    def build(
        self,
        module: nn.Module,
        example_inputs,
        batch_sizes: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Runner:
        m = module if dtype == torch.float32 else copy.deepcopy(module).to(dtype)
        reason = "reference path" if dtype == torch.float32 else f"cast copy in {dtype_name(dtype)}"
        report = EngineReport(self.name, dtype_name(dtype), str(device), None, reason=reason)
        return Runner({0: m}, dtype, report)
