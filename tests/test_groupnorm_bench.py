"""The tiled group-norm candidate of experiments/groupnorm_bench.py: its merge and its kernel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_experiment
from torch.nn import functional as F  # noqa: N812

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "groupnorm_bench.py"


def _load():
    return load_experiment("groupnorm_bench")


def _torch_tiles(x: torch.Tensor, groups: int, block_p: int):
    """What the kernel computes, in torch: per-tile group means and centred second moments."""
    b, c, h, w = x.shape
    flat = x.permute(0, 2, 3, 1).reshape(b, h * w, groups, c // groups)  # [B, P, G, CG]
    means, m2s, counts = [], [], []
    for start in range(0, h * w, block_p):
        tile = flat[:, start : start + block_p]  # [B, p, G, CG]
        mean = tile.mean(dim=(1, 3))  # [B, G]
        means.append(mean)
        m2s.append((tile - mean[:, None, :, None]).square().sum(dim=(1, 3)))
        counts.append(float(tile.shape[1] * (c // groups)))
    return torch.stack(means, 1), torch.stack(m2s, 1), torch.tensor(counts)


def test_tile_merge_equals_group_norm_with_an_offset_and_a_short_last_tile():
    gb = _load()
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 10, 10, dtype=torch.float64) + 50.0).contiguous(
        memory_format=torch.channels_last
    )  # 100 pixels in tiles of 32: the last holds 4
    weight, bias = torch.rand(64, dtype=torch.float64) + 0.5, torch.randn(64, dtype=torch.float64)
    mean_t, m2_t, counts = _torch_tiles(x, 32, 32)
    out = gb.merge_and_apply(x, mean_t, m2_t, counts.double(), weight, bias)
    ref = F.silu(F.group_norm(x, 32, weight, bias, gb.EPS))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_the_script_runs_its_torch_variants_on_cpu(tmp_path):
    argv = ["--device", "cpu", "--dtype", "fp32", "--batch", "1", "--shapes", "64:8"]
    argv += ["--iters", "2", "--variants", "eager,inductor_channel_stats", "--out", str(tmp_path)]
    assert _load().main(argv) == 0
    rows = (tmp_path / "groupnorm_bench.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert '"max_abs_err_vs_fp32": 0.0' in rows[0]  # eager fp32 is the reference itself


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (the CPU torch wheel brings none); with triton this runs "
    "the kernel in Triton's interpreter (TRITON_INTERPRET=1), on a GPU host natively",
)
def test_triton_tiles_match_group_norm_in_the_interpreter(tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "fp32", "--batch", "2",
         "--shapes", "64:10,128:8", "--iters", "1", "--variants", "triton_tiles",
         "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    rows = [json.loads(r) for r in (tmp_path / "groupnorm_bench.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["triton_tiles", "triton_tiles"]
    assert all(r["max_abs_err_vs_fp32"] < 1e-5 for r in rows), rows
