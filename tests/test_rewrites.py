"""Engine rewrites: the same function as the modules they replace, in the engines' copies only."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from musetalk_rt.engines import get_engine, select_engine
from musetalk_rt.engines.rewrites import (
    REWRITES_VERSION,
    SPLIT_PIXELS,
    STATS_FORMS,
    UPSAMPLE_FORMS,
    UPSAMPLERS,
    ChannelsLastGroupNorm,
    PhaseUpsample,
    TransposeUpsample,
    channel_stats,
    channels_last_group_norms,
    phase_upsamplers,
)
from musetalk_rt.errors import UserError
from musetalk_rt.stages import VaeDecodeStage

CPU = torch.device("cpu")
FORMS = [PhaseUpsample, TransposeUpsample]  # the two forms of --phase-upsample


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_phase_upsample_equals_upsample_then_conv(form, bias, channels_last):
    torch.manual_seed(0)
    up = Upsample2D(8, use_conv=True, out_channels=6, bias=bias).eval()
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)  # odd, unequal sides: the borders matter
    up = up.double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = up(x)  # [3, 6, 10, 14]
        out = form(up.conv)(x)
    assert out.shape == ref.shape == (3, 6, 10, 14)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
def test_phase_upsample_refuses_an_explicit_output_size(form):
    up = Upsample2D(4, use_conv=True).eval()
    with pytest.raises(ValueError, match="without --phase-upsample"):
        form(up.conv)(torch.randn(1, 4, 3, 3), (5, 5))


@pytest.mark.parametrize("form", FORMS)
def test_phase_upsample_keeps_the_memory_format(form):
    up = Upsample2D(4, use_conv=True).eval()
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        cl = form(up.conv)(x.contiguous(memory_format=torch.channels_last))
        plain = form(up.conv)(x)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    torch.testing.assert_close(cl, plain)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_phase_upsample_in_half_precision_stays_near_the_original(form, dtype):
    # the phase weights are sums of 3x3 taps rounded once: a little more rounding than the
    # original's, measured at ~1.6-1.8x its error against float64
    torch.manual_seed(3)
    up = Upsample2D(64, use_conv=True).eval()
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        ref = up.double()(x.double())
        err_orig = (up.to(dtype)(x.to(dtype)).double() - ref).abs().max().item()
        err_phase = form(up.conv.double()).to(dtype)(x.to(dtype)).double() - ref
    assert err_phase.abs().max().item() < 3 * err_orig


def test_only_plain_nearest_upsamplers_are_rewritten():
    m = torch.nn.ModuleDict(
        {
            "plain": Upsample2D(4, use_conv=True),
            "no_conv": Upsample2D(4, use_conv=False),
            "transposed": Upsample2D(4, use_conv_transpose=True),
            "kernel_5": Upsample2D(4, use_conv=True, kernel_size=5, padding=2),
            "no_interpolate": Upsample2D(4, use_conv=True, interpolate=False),
            "normed": Upsample2D(4, use_conv=True, norm_type="rms_norm", eps=1e-5),
            "named_op": Upsample2D(4, use_conv=True, name="Conv2d_0"),
        }
    )
    assert phase_upsamplers(m) == 1
    assert isinstance(m["plain"], PhaseUpsample)
    assert all(isinstance(m[k], Upsample2D) for k in m if k != "plain")
    m["plain"] = Upsample2D(4, use_conv=True)
    assert phase_upsamplers(m, "transpose") == 1
    assert isinstance(m["plain"], TransposeUpsample)


@pytest.mark.parametrize("shape", [(2, 8, 6, 5), (2, 8, 30), (2, 8, 32, 16)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stats", STATS_FORMS)
def test_channels_last_group_norm_equals_group_norm(shape, affine, stats):
    torch.manual_seed(1)
    gn = torch.nn.GroupNorm(4, 8, eps=1e-6, affine=affine).double()
    if affine:
        torch.nn.init.normal_(gn.weight)
        torch.nn.init.normal_(gn.bias)
    # a large offset against a small spread: the merge of per-channel statistics must not cancel
    x = (torch.randn(shape, dtype=torch.float64) + 100.0) * torch.linspace(0.5, 2, 8).view(
        1, 8, *([1] * (len(shape) - 2))
    ).double()
    with torch.no_grad():
        ref = gn(x)
        out = ChannelsLastGroupNorm(gn, stats)(x)
        out_cl = ChannelsLastGroupNorm(gn, stats)(
            x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        )
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out_cl, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stats", ["split", "split_sums"])
@pytest.mark.parametrize("split_pixels", [1, 7, 10, 30, 64, 128])
@pytest.mark.parametrize("shape", [(2, 8, 30), (2, 8, 16, 8)])  # 30 and 128 pixels
def test_split_statistics_equal_group_norm_at_any_chunk_size(stats, split_pixels, shape):
    # chunks that divide the pixels, that do not (reduced whole), one as large as all pixels,
    # one larger; the attention's [B, C, L] input and a non-contiguous channels-last view
    g = torch.Generator().manual_seed(split_pixels)
    gn = torch.nn.GroupNorm(4, 8, eps=1e-6).double()
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ChannelsLastGroupNorm(gn, stats, split_pixels)(x)
    torch.testing.assert_close(out, gn(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("stats", STATS_FORMS)
def test_channel_statistics_in_fp32_do_not_cancel(stats):
    # fp32 channels with a mean 1000 times their spread, over more pixels than one split chunk:
    # the sums' forms must stay as near the float64 truth as Welford's
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, SPLIT_PIXELS * 4, generator=g, dtype=torch.float64) + 1000.0
    gn = torch.nn.GroupNorm(2, 4, affine=False)
    with torch.no_grad():
        ref = gn.double()(x)
        out = ChannelsLastGroupNorm(gn, stats)(x.float())
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-3)


def test_an_unknown_statistics_form_names_the_known_ones():
    with pytest.raises(UserError, match="unknown statistics form 'pairwise'.*welford"):
        ChannelsLastGroupNorm(torch.nn.GroupNorm(2, 4), "pairwise")
    with pytest.raises(UserError, match="unknown statistics form 'mean'"):
        channel_stats(torch.zeros(1, 2, 3), "mean")
    with pytest.raises(UserError, match="split_pixels must be at least 1, not 0"):
        ChannelsLastGroupNorm(torch.nn.GroupNorm(2, 4), "split", 0)


def test_the_engines_norm_splits_its_statistics():
    # the form measured fastest on an H100 (experiments/LOG.md, 2026-12-05 18:40)
    m = torch.nn.Sequential(torch.nn.GroupNorm(2, 4))
    assert channels_last_group_norms(m) == 1
    assert (m[0].stats, m[0].split_pixels) == ("split", SPLIT_PIXELS)


def test_channels_last_group_norm_keeps_the_input_dtype():
    gn = torch.nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    out = ChannelsLastGroupNorm(gn).to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), gn(x.float()), rtol=2e-2, atol=2e-2)


def test_rewrites_of_the_tiny_models_keep_their_outputs(tiny_models):
    import copy

    from musetalk_rt.engines.rewrites import apply_rewrites
    from musetalk_rt.modeling import UNetStep, VaeDecodeStep

    torch.manual_seed(2)
    latents, audio = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)  # [B, 8, 32, 32]
    for ref, inputs in (
        (UNetStep(tiny_models.unet), (latents, audio)),
        (VaeDecodeStep(tiny_models.vae), (latents[:, :4],)),
    ):
        m = copy.deepcopy(ref)
        note = apply_rewrites(m, True, True)
        assert "phase upsample, interleave (" in note and "interleave (0 " not in note
        assert "channels-last group norm (" in note and "norm (0 " not in note
        with torch.no_grad():
            torch.testing.assert_close(m(*inputs), ref(*inputs), rtol=1e-4, atol=1e-4)
    # the reference modules are untouched
    for model in (tiny_models.unet, tiny_models.vae):
        assert not any(
            isinstance(m, (PhaseUpsample, ChannelsLastGroupNorm)) for m in model.modules()
        )
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


@pytest.mark.parametrize("form", ["interleave", "transpose"])
def test_the_compile_engine_compiles_its_rewritten_copy(tiny_models, monkeypatch, form):
    # what reaches torch.compile (Dynamo's tracing of the tiny models alone takes ~15 s on two
    # cores; the compiled path with the rewrites ran and passed the gate on an H200)
    seen = []

    def no_compile(m, **kwargs):
        seen.append(m)
        return m

    monkeypatch.setattr(torch, "compile", no_compile)
    engine = get_engine(
        "compile", backend="aot_eager", phase_upsample=form, channels_last_norm=True
    )
    v = VaeDecodeStage(tiny_models.vae, engine, torch.float32, CPU)
    v.prepare([2])
    assert f"phase upsample, {form} (" in v.runner.report.reason
    cls = UPSAMPLERS[form]
    assert any(isinstance(m, cls) for m in seen[0].modules())
    assert any(isinstance(m, ChannelsLastGroupNorm) for m in seen[0].modules())
    ref = VaeDecodeStage(tiny_models.vae, get_engine("eager"), torch.float32, CPU)
    ref.prepare([2])
    z = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(v.run(z), ref.run(z), rtol=1e-4, atol=1e-4)


def test_rewrite_counts_on_the_vae_decoder(tiny_models):
    import copy

    vae = copy.deepcopy(tiny_models.vae)
    n_up = sum(isinstance(m, Upsample2D) for m in vae.decoder.modules())
    n_gn = sum(type(m) is torch.nn.GroupNorm for m in vae.modules())
    assert phase_upsamplers(vae) == n_up > 0
    assert channels_last_group_norms(vae) == n_gn > 0


def test_rewrite_options_from_the_cli_reach_the_engines_and_their_keys():
    from musetalk_rt.cli import _engine_options, build_parser

    opts = _engine_options(
        build_parser().parse_args(["bench", "--phase-upsample", "--channels-last-norm"])
    )
    assert opts == {"phase_upsample": True, "channels_last_norm": True}
    engine, _ = select_engine("compile", "cpu", torch.float32, **opts)
    key = engine.cache_options()
    assert key["phase_upsample"] and key["channels_last_norm"]
    assert key["rewrites_version"] == REWRITES_VERSION  # a changed rewrite changes the key
    one = get_engine("compile", phase_upsample=True).cache_options()
    assert one["phase_upsample"] and "channels_last_norm" not in one and one != key
    # absent when off: keys of engines built before the rewrites stay valid
    assert "phase_upsample" not in get_engine("compile").cache_options()
    assert "phase_upsample" not in get_engine("aoti").cache_options()
    assert get_engine("aoti", phase_upsample=True).cache_options()["phase_upsample"]
    # aoti takes the norm rewrite too (since 2026-12-04); an engine without rewrites refuses it
    assert get_engine("aoti", channels_last_norm=True).cache_options()["channels_last_norm"]
    with pytest.raises(UserError, match="does not take the options channels_last_norm"):
        get_engine("eager", channels_last_norm=True)


def test_the_transpose_form_is_its_own_engine_key_and_label():
    from musetalk_rt.cli import _engine_options, build_parser
    from musetalk_rt.workbench.report import config_label

    parse = build_parser().parse_args
    assert _engine_options(parse(["bench", "--phase-upsample", "interleave"])) == {
        "phase_upsample": True  # the first form, recorded as rows and keys recorded it before
    }
    opts = _engine_options(parse(["bench", "--phase-upsample", "transpose"]))
    assert opts == {"phase_upsample": "transpose"}
    for name in ("compile", "aoti"):
        key = get_engine(name, **opts).cache_options()
        assert key["phase_upsample"] == "transpose"
        assert key != get_engine(name, phase_upsample=True).cache_options()
    row = {"engine": "compile", "dtype": "fp16", "engine_options": opts}
    assert config_label(row) == "compile fp16 (phase-upsample=transpose)"
    assert tuple(UPSAMPLERS) == UPSAMPLE_FORMS and list(UPSAMPLERS.values()) == FORMS
    # the CLI's choices (written out there, to keep torch out of its import) are the forms
    for form in UPSAMPLE_FORMS:
        assert parse(["bench", "--phase-upsample", form]).phase_upsample == form
    with pytest.raises(SystemExit):
        parse(["bench", "--phase-upsample", "sideways"])
    with pytest.raises(UserError, match="interleave, transpose"):
        get_engine("compile", phase_upsample="sideways")


@pytest.mark.parametrize("form", FORMS)
def test_phase_upsample_builds_on_the_weights_device(form, monkeypatch):
    # the engine's copy is already on the GPU when it is rewritten (a CPU tap matrix beside CUDA
    # weights failed there); "meta" stands in for the GPU, and every operand must be on it
    einsum = torch.einsum

    def same_device_einsum(eq, *ops):
        assert len({o.device for o in ops}) == 1, [o.device for o in ops]
        return einsum(eq, *ops)

    monkeypatch.setattr(torch, "einsum", same_device_einsum)
    up = Upsample2D(4, use_conv=True, out_channels=3).to("meta")
    p = form(up.conv)
    shape = (12, 4, 2, 2) if form is PhaseUpsample else (4, 3, 4, 4)  # conv_transpose: [I, O]
    assert p.weight.device.type == "meta" and p.weight.shape == shape


def test_readme_table_labels_a_rewritten_engine():
    from musetalk_rt.workbench.report import config_label

    row = {"engine": "compile", "dtype": "fp16", "engine_options": {"phase_upsample": True}}
    assert config_label(row) == "compile fp16 (phase-upsample)"
    assert config_label({**row, "engine_options": {}}) == "compile fp16"
    # a later version of the rewrites is its own line (the first one's rows did not record it)
    row["engine_options"]["rewrites_version"] = 2
    assert config_label(row) == "compile fp16 (phase-upsample, rewrites-version=2)"


@pytest.mark.parametrize("form", ["interleave", "transpose"])
def test_aoti_exports_the_rewritten_copy(tiny_models, form):
    # the aoti build exports what prepare_module returns (a full CPU build is the slow aoti test)
    from musetalk_rt.engines.aoti import prepare_module
    from musetalk_rt.modeling import VaeDecodeStep

    ref = VaeDecodeStep(tiny_models.vae)
    m = prepare_module(ref, torch.float32, CPU, phase_upsample=form)
    cls = UPSAMPLERS[form]
    assert any(isinstance(x, cls) for x in m.modules())
    assert not any(isinstance(x, (PhaseUpsample, TransposeUpsample)) for x in ref.modules())
    z = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(z), ref(z), rtol=1e-4, atol=1e-4)
