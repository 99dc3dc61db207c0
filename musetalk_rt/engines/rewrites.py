"""Exact rewrites of the engine's copy of a module: the same function, less memory traffic.

A kernel profile of the compiled VAE decoder at batch 32 on an H200 (experiments/LOG.md,
``kernel_profile``) put its convolutions at ~700 TFLOP/s — near the card's matrix peak — and
39% of its time in group norms and pointwise kernels moving ~3.4x more bytes per second than
the work needs. Two rewrites go after what is left; each is the same function in exact
arithmetic (tests compare them with the originals) and the quality gate checks each build:

* :class:`PhaseUpsample` — a nearest-neighbour 2x upsample followed by a 3x3 convolution (the
  decoder's and UNet's ``Upsample2D``) equals, for each of the four output phases
  ``(row % 2, col % 2)``, a 2x2 convolution of the *small* input: with ``x`` zero-padded by
  one, output row ``2i`` sees input rows ``i-1, i`` through taps ``w0`` and ``w1 + w2`` and row
  ``2i+1`` sees rows ``i, i+1`` through ``w0 + w1`` and ``w2`` (the same for columns). One 2x2
  convolution with four times the output channels computes all phases on an ``(N+1)^2`` grid;
  phase ``(a, b)`` is its window shifted by ``(a, b)``, interleaved into the output. 16 instead
  of 36 multiply-adds per input pixel and channel pair (~17 with the grid's extra row and
  column at 32x32; the upsamplers are 28% of the decoder's work), and the upsampled input is
  never written.
* :class:`TransposeUpsample` — the same function as one transposed convolution (stride 2,
  kernel 4, padding 1) of the small input: output row ``o`` takes input rows ``i`` with
  ``o = 2i - 1 + k``, and the 4x4 kernel holds the four phases' 2x2 taps at interleaved
  positions (``[w2, w1 + w2, w0 + w1, w0]`` along each axis), so the convolution writes the
  interleaved output itself — no separate interleave pass (an H200 profile of the phase form
  found its interleave fused into the next norm's reduction as a 3.6 ms gather at batch 32).
  ``--phase-upsample transpose``.
* :class:`ChannelsLastGroupNorm` — group norm whose statistics are per-channel reductions over
  the pixels (contiguous in channels-last memory, where every pixel's channels sit together),
  merged into group statistics exactly (mean of means; variance = mean of the channels'
  variances + variance of their means, equal counts), then one scale-and-shift per channel.
  The library decomposition reduces each group over channels *and* pixels, which in
  channels-last memory reads a few channels of every pixel: strided loads. Since version 3 each
  channel is reduced over chunks of 256 pixels first and the chunks are merged the same way
  (:func:`channel_stats`): one output per image and channel left inductor's reduction too few
  to fill an H100, and the chunks took 4–5% off the VAE decoder at batch 32 (experiments/LOG.md,
  2026-12-05 18:40).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from musetalk_rt.errors import UserError

# part of an engine's cache key when a rewrite is on: raise it whenever a rewrite's code changes
# (1: the rewrites as measured first; 2: output in the input's memory format, bias in the conv;
# 3: the group norm's statistics split over chunks of pixels)
REWRITES_VERSION = 3
# how a rewritten upsampler computes its four phases (``--phase-upsample FORM``)
UPSAMPLE_FORMS = ("interleave", "transpose")


def upsample_form(phase_upsample: bool | str | None) -> str | None:
    """The upsampler rewrite's form: ``None`` (off), ``interleave`` (``True``) or ``transpose``.

    Raises:
        UserError: An unknown form (the message names the known ones).
    """
    if phase_upsample is None or phase_upsample is False:
        return None
    if phase_upsample is True:
        return "interleave"
    if phase_upsample not in UPSAMPLE_FORMS:
        raise UserError(
            f"unknown --phase-upsample form {phase_upsample!r}; choose one of "
            + ", ".join(UPSAMPLE_FORMS)
        )
    return phase_upsample


def _fixed_scale(output_size) -> None:
    """A rewritten upsampler computes a 2x scale only: refuse an explicit output size."""
    if output_size is not None:
        raise ValueError(
            "this upsampler was rewritten for a fixed 2x scale (--phase-upsample) and cannot "
            "take an explicit output size; build the engine without --phase-upsample"
        )


class PhaseUpsample(nn.Module):
    """Nearest 2x upsample + 3x3 convolution (padding 1) as one 2x2 convolution of the input.

    The output keeps the input's memory format (channels-last in, channels-last out, as the
    module it replaces), so the convolution after it reads it without a layout change.

    Args:
        conv: The 3x3 convolution (stride 1, padding 1, no dilation or groups) that followed
            the upsample.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().double()  # [O, I, 3, 3]
        # taps of output phase a (0: even rows, 1: odd rows) over input rows (i-1+a, i+a)
        r = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=w.dtype)
        r = r.to(w.device)  # the module may already be on the GPU
        # phase (a, b): [O, I, 2, 2] = R_a @ w @ R_b^T over the kernel's rows and columns
        phases = [torch.einsum("pr,oirs,qs->oipq", r[a], w, r[b]) for a in (0, 1) for b in (0, 1)]
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(
            torch.cat(phases).to(conv.weight.dtype), requires_grad=False
        )  # [4 * O, I, 2, 2]
        # every phase adds the same bias: inside the convolution, no separate pass
        self.bias = (
            None if conv.bias is None else nn.Parameter(conv.bias.detach().repeat(4), False)
        )  # [4 * O]

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        _fixed_scale(output_size)
        (h, w), o = x.shape[-2:], self.out_channels
        y = F.conv2d(x, self.weight, self.bias, padding=1)  # [B, 4 * O, H + 1, W + 1]
        # phase (a, b) (output rows 2i + a, columns 2j + b) is y's block k = 2a + b, shifted
        p = [y[:, k * o : (k + 1) * o] for k in range(4)]  # each [B, O, H + 1, W + 1]
        win = [[p[2 * a + b][..., a : a + h, b : b + w] for b in (0, 1)] for a in (0, 1)]
        if x.is_contiguous(memory_format=torch.channels_last):
            # interleave as [B, H, 2, W, 2, O]: channels-last memory of [B, O, 2H, 2W]
            rows = [torch.stack([q.permute(0, 2, 3, 1) for q in win[a]], dim=3) for a in (0, 1)]
            out = torch.stack(rows, dim=2).reshape(x.shape[0], 2 * h, 2 * w, o)
            return out.permute(0, 3, 1, 2)  # [B, O, 2H, 2W], channels-last strides
        rows = [torch.stack(win[a], dim=-1) for a in (0, 1)]  # each [B, O, H, W, 2]
        return torch.stack(rows, dim=3).reshape(x.shape[0], o, 2 * h, 2 * w)  # [B, O, 2H, 2W]


class TransposeUpsample(nn.Module):
    """Nearest 2x upsample + 3x3 convolution (padding 1) as one transposed convolution.

    Stride 2, kernel 4, padding 1 over the small input: the same output as
    :class:`PhaseUpsample`, written interleaved by the convolution itself (see the module
    docstring).

    Args:
        conv: The 3x3 convolution (padding 1; see :class:`PhaseUpsample`) that followed the
            upsample.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().double()  # [O, I, 3, 3]: the 3x3 taps
        # kernel position p (0..3) of the transposed conv over the 3x3 taps r: w2, w1+w2, w0+w1, w0
        t = torch.tensor([[0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=w.dtype)
        t = t.to(w.device)
        self.weight = nn.Parameter(
            torch.einsum("pr,oirs,qs->iopq", t, w, t).to(conv.weight.dtype), requires_grad=False
        )  # [I, O, 4, 4]: conv_transpose2d's layout
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), False)

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        _fixed_scale(output_size)
        # [B, I, H, W] -> [B, O, 2H, 2W]
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2, padding=1)


# the module of each form (keys: UPSAMPLE_FORMS)
UPSAMPLERS = {"interleave": PhaseUpsample, "transpose": TransposeUpsample}


def _phase_convertible(m: nn.Module) -> bool:
    """A diffusers ``Upsample2D`` that interpolates 2x (nearest) then runs a plain 3x3 conv."""
    conv = getattr(m, "conv", None)
    return (
        type(m).__name__ == "Upsample2D"
        and getattr(m, "interpolate", False)
        and getattr(m, "use_conv", False)
        and not getattr(m, "use_conv_transpose", True)
        and getattr(m, "norm", None) is None
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# how a ChannelsLastGroupNorm reduces its channels over the pixels (see ``channel_stats``)
STATS_FORMS = ("welford", "sums", "split", "split_sums")
SPLIT_PIXELS = 256  # pixels per partial reduction of the ``split`` forms


def _check_stats_form(form: str) -> None:
    if form not in STATS_FORMS:
        raise UserError(f"unknown statistics form {form!r}; choose from {STATS_FORMS}")


def channel_stats(
    flat: torch.Tensor, form: str = "split", split_pixels: int = SPLIT_PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and (biased) variance over the pixels, computed in ``form``.

    All forms are the same function up to rounding; they differ in the reductions inductor is
    given. ``welford``: one ``var_mean`` over all pixels. ``sums``: the sum and the sum of
    squares of ``x - x[first pixel]`` (one multi-output reduction; the shift keeps a channel
    whose mean is large against its spread from cancelling). ``split`` / ``split_sums``: the
    same over chunks of ``split_pixels`` pixels first, then merged over the chunks (equal counts:
    mean of means, and mean of variances plus variance of means), so the first reduction has
    ``B * L / split_pixels * C`` outputs to spread over the card instead of ``B * C`` (a tensor
    whose pixels do not divide into chunks is reduced whole).

    Args:
        flat: ``[B, L, C]`` in the accumulation dtype.
        form: One of ``STATS_FORMS``.
        split_pixels: Pixels per chunk of the ``split`` forms.

    Returns:
        ``(mean, var)``, each ``[B, C]``.
    """
    _check_stats_form(form)
    b, n, c = flat.shape
    if form == "welford":
        var, mean = torch.var_mean(flat, dim=1, correction=0)  # [B, C] each
        return mean, var
    split = form.startswith("split") and n > split_pixels and n % split_pixels == 0
    parts = flat.reshape(b, -1, split_pixels, c) if split else flat.unsqueeze(1)  # [B, S, P, C]
    if form.endswith("sums"):
        shift = flat[:, :1]  # [B, 1, C]
        d = parts - shift.unsqueeze(1)  # [B, S, P, C]
        mean_d = d.sum(2).sum(1) / n  # [B, C]
        var = (d.square().sum(2).sum(1) / n - mean_d.square()).clamp_min(0)
        return mean_d + shift[:, 0], var
    var_s, mean_s = torch.var_mean(parts, dim=2, correction=0)  # [B, S, C] each
    mean = mean_s.mean(1)  # [B, C]
    return mean, var_s.mean(1) + (mean_s - mean.unsqueeze(1)).square().mean(1)


class ChannelsLastGroupNorm(nn.Module):
    """``nn.GroupNorm`` with per-channel statistics merged into group statistics.

    Same result as the module it replaces (up to rounding); inputs of any rank ``[B, C, ...]``.

    Args:
        norm: The group norm to replace (its weights are shared, not copied).
        stats: How the per-channel statistics are reduced (``STATS_FORMS``; ``channel_stats``).
        split_pixels: Pixels per chunk of the ``split`` forms.
    """

    def __init__(self, norm: nn.GroupNorm, stats: str = "split", split_pixels: int = SPLIT_PIXELS):
        super().__init__()
        _check_stats_form(stats)  # here, not in a build
        if split_pixels < 1:
            raise UserError(f"split_pixels must be at least 1, not {split_pixels}")
        self.num_groups, self.num_channels, self.eps = norm.num_groups, norm.num_channels, norm.eps
        self.stats, self.split_pixels = stats, split_pixels
        self.weight = None if norm.weight is None else nn.Parameter(norm.weight.detach(), False)
        self.bias = None if norm.bias is None else nn.Parameter(norm.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, g = x.shape[0], self.num_channels, self.num_groups
        acc = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
        flat = x.movedim(1, -1).reshape(b, -1, c)  # [B, L, C]: a view in channels-last memory
        mean_c, var_c = channel_stats(flat.to(acc), self.stats, self.split_pixels)  # [B, C] each
        mean_c, var_c = mean_c.view(b, g, -1), var_c.view(b, g, -1)  # [B, G, C/G]
        mean_g = mean_c.mean(-1, keepdim=True)  # [B, G, 1]
        var_g = var_c.mean(-1, keepdim=True) + (mean_c - mean_g).square().mean(-1, keepdim=True)
        scale = torch.rsqrt(var_g + self.eps).expand(b, g, c // g)  # [B, G, C/G]
        if self.weight is not None:
            scale = scale * self.weight.to(acc).view(g, -1)
        shift = -mean_g * scale
        if self.bias is not None:
            shift = shift + self.bias.to(acc).view(g, -1)
        shape = (b, c) + (1,) * (x.dim() - 2)
        y = x.to(acc) * scale.reshape(shape) + shift.reshape(shape)
        return y.to(x.dtype)


def _replace(module: nn.Module, pick, make) -> int:
    """Replace every submodule ``m`` with ``pick(m)`` true by ``make(m)``; returns how many."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if pick(child):
                setattr(parent, name, make(child))
                n += 1
    return n


def phase_upsamplers(module: nn.Module, form: str = "interleave") -> int:
    """Rewrite every nearest-2x ``Upsample2D`` + 3x3 conv in ``module`` as one convolution.

    Args:
        module: Rewritten in place.
        form: ``interleave`` (:class:`PhaseUpsample`) or ``transpose``
            (:class:`TransposeUpsample`).

    Returns:
        How many were rewritten.
    """
    make = UPSAMPLERS[upsample_form(form)]
    return _replace(module, _phase_convertible, lambda m: make(m.conv))


def channels_last_group_norms(module: nn.Module) -> int:
    """Rewrite every ``nn.GroupNorm`` in ``module`` as a :class:`ChannelsLastGroupNorm`.

    Returns:
        How many were rewritten.
    """
    return _replace(module, lambda m: type(m) is nn.GroupNorm, ChannelsLastGroupNorm)


def rewrite_options(phase_upsample: bool | str, channels_last_norm: bool) -> dict:
    """The rewrites for an engine-cache key (absent when off: older keys stay valid).

    ``phase_upsample`` is ``True`` for the interleave form (as keys and rows recorded it before
    there was a second form) and the form's name otherwise.
    """
    opts = {}
    form = upsample_form(phase_upsample)
    if form:
        opts["phase_upsample"] = True if form == "interleave" else form
    if channels_last_norm:
        opts["channels_last_norm"] = True
    if opts:  # a changed rewrite must not load engines built by the old one
        opts["rewrites_version"] = REWRITES_VERSION
    return opts


def apply_rewrites(module: nn.Module, phase_upsample: bool | str, channels_last_norm: bool) -> str:
    """Apply the chosen rewrites to ``module`` in place; returns a note for the engine report."""
    notes = []
    form = upsample_form(phase_upsample)
    if form:
        notes.append(f"phase upsample, {form} ({phase_upsamplers(module, form)} upsamplers)")
    if channels_last_norm:
        notes.append(f"channels-last group norm ({channels_last_group_norms(module)} norms)")
    return "".join(f", {n}" for n in notes)
