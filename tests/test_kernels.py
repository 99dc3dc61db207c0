"""The kernel breakdown: kernel names to kinds, counted work, and a CPU profile that adds up."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import load_experiment

from musetalk_rt.workbench.kernels import (
    KINDS,
    flops_per_frame,
    format_breakdown,
    kernel_arch,
    kernel_breakdown,
    kernel_kind,
)

# kernel names as an H100/H200 profile of the stages shows them (cuDNN, cuBLAS, inductor, flash)
NAMES = {
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_"
    "warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cudnn": ("conv", "sm90"),
    "cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_32x4_"
    "nhwc_align8>": ("conv", "sm80"),
    "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_cublas": (
        "gemm",
        "sm90",
    ),
    "nvjet_sm90_hsh_168x128_64x5_1x2_h_bz_coopA_bias_TNN": ("gemm", "sm90"),
    "triton_poi_fused_convolution_silu_12": ("pointwise", None),
    "triton_red_fused_native_group_norm_3": ("norm", None),
    "triton_per_fused__softmax_7": ("norm", None),
    "triton_tem_fused_convolution_4": ("conv", None),
    "triton_tem_fused_mm_9": ("gemm", None),
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": (
        "attention",
        None,
    ),
    "void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>": ("layout", None),
    "Memcpy DtoH (Device -> Pinned)": ("copy", None),
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>": ("copy", None),
    "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half>(long, "
    "c10::Half, c10::Half const*, float*, float*)": ("norm", None),
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>": (
        "pointwise",
        None,
    ),
    "aten::mkldnn_convolution": ("conv", None),
    "aten::native_group_norm": ("norm", None),
    "aten::addmm": ("gemm", None),
    "some_unheard_of_kernel": ("other", None),
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_names_map_to_their_kind_and_architecture(name):
    kind, arch = NAMES[name]
    assert kernel_kind(name) == kind
    assert kernel_arch(name) == arch


def test_flops_of_a_convolution_are_counted_per_frame():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    flops = flops_per_frame(conv, (torch.randn(1, 4, 16, 16),))
    assert flops == {"conv": 2 * 4 * 8 * 3 * 3 * 16 * 16}


def test_breakdown_of_the_tiny_stages_on_cpu_adds_up(tiny_models):
    from musetalk_rt.workbench.profile import make_generator

    gen = make_generator(tiny_models, "eager", "fp32", (2,), log=lambda _: None)
    stages = kernel_breakdown(gen, 2, iters=2)
    assert set(stages) == {"unet", "vae_decode"}
    for s in stages.values():
        assert set(s["kinds"]) <= set(KINDS)
        kinds_ms = sum(k["ms"] for k in s["kinds"].values())
        assert kinds_ms == pytest.approx(s["ms"], rel=1e-3)
        assert sum(k["share"] for k in s["kinds"].values()) == pytest.approx(1.0, abs=1e-3)
        assert s["kinds"]["conv"]["gflop"] > 0  # both stages are convolution networks
        assert s["sm90_share"] == {"conv": None, "gemm": None}  # no kernel names on the CPU
    # the batch scales the counted work: the UNet's work at batch 2 is twice batch 1's
    one = flops_per_frame(gen.unet.module, gen.unet.example_inputs(1))
    assert stages["unet"]["kinds"]["conv"]["gflop"] == pytest.approx(2 * one["conv"] / 1e9, 1e-3)
    text = format_breakdown("eager fp32 B2", stages)
    assert "eager fp32 B2 vae_decode" in text and "conv" in text


def test_kernel_profile_script_writes_a_row_and_one_json_line(tmp_path, capsys):
    script = load_experiment("kernel_profile")
    argv = ["--engines", "eager", "--batch-sizes", "2", "--dtype", "fp32", "--weights", "tiny"]
    assert script.main(argv + ["--device", "cpu", "--iters", "1", "--out", str(tmp_path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["rows"][0]["batch"] == 2 and last["rows"][0]["kernel_ms"] > 0
    row = json.loads((tmp_path / "kernel_profile.jsonl").read_text().splitlines()[0])
    assert row["scenario"] == "kernels_eager_fp32_b2" and row["weights"] == "tiny"
    assert set(row["stages"]) == {"unet", "vae_decode"}
    # the rewrites in a scenario's name: the upsampler's form when it is not the first one
    tag = script.rewrite_tag
    assert tag({}) == "" and tag({"phase_upsample": True}) == "_phase_upsample"
    assert tag({"phase_upsample": "transpose", "channels_last_norm": True}) == (
        "_phase_upsample_transpose_channels_last_norm"
    )
    assert tag({"phase_upsample": True, "autotune_stages": "vae_decode,unet"}) == (
        "_phase_upsample_autotune_unet+vae_decode"
    )


def test_kernel_profile_build_that_fails_marks_it_ready_for_its_gpu_peers(tmp_path):
    script = load_experiment("kernel_profile")
    turns = tmp_path / "turns"
    argv = ["--engines", "no-such-engine", "--batch-sizes", "2", "--weights", "tiny"]
    argv += ["--device", "cpu", "--out", str(tmp_path), "--gpu-turns", str(turns)]
    with pytest.raises(Exception, match="no-such-engine"):
        script.main(argv + ["--gpu-peers", "2"])
    # its peer need not wait for it until the deadline
    assert [p.name for p in turns.glob("ready.*")] == [f"ready.{os.getpid()}"]
