"""experiments/fp8_quality.py: its e4m3 rounding and one run on the tiny networks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_experiment
from torch import nn


def _load():
    return load_experiment("fp8_quality")


def test_e4m3_rounding_keeps_its_grid_saturates_and_bounds_the_error():
    fq = _load()
    one = torch.tensor(1.0)
    # e4m3 holds 1, 1.125 (3 mantissa bits), 448 (its largest) and 2^-9 (its smallest subnormal)
    exact = torch.tensor([1.0, 1.125, -448.0, 2.0**-9, 0.0])
    assert torch.equal(fq.fake_e4m3(exact, one), exact)
    assert torch.equal(fq.fake_e4m3(torch.tensor([1e6, -1e6]), one), torch.tensor([448.0, -448.0]))
    x = torch.randn(10_000)
    scale = x.abs().amax() / fq.E4M3_MAX
    rel = ((fq.fake_e4m3(x, scale) - x).abs() / x.abs()).masked_fill(x.abs() < 1e-2, 0)
    assert 0.0 < float(rel.max()) <= 2.0**-4 + 1e-6  # half an ulp of 3 mantissa bits
    # a scaled tensor uses the grid: scale amax/448 maps its amax onto 448 exactly
    assert float(fq.fake_e4m3(x, scale).abs().max()) == pytest.approx(float(x.abs().max()))


def test_quantize_layers_rounds_weights_per_output_channel_and_inputs_per_call():
    fq = _load()
    torch.manual_seed(0)
    lin = nn.Linear(64, 3)
    lin.weight.data[1] *= 1000.0  # one loud output channel must not flatten the others
    w = lin.weight.data.clone()
    hooks = fq.quantize_layers([lin])
    for row in range(3):  # each row on its own grid: every row keeps ~3 significant bits
        err = (lin.weight.data[row] - w[row]).abs().max() / w[row].abs().max()
        assert 0.0 < float(err) <= 2.0**-4 + 1e-6
    x = torch.randn(5, 64)
    got = lin(x)
    xq = fq.fake_e4m3(x, x.abs().amax() / fq.E4M3_MAX)
    assert torch.allclose(got, nn.functional.linear(xq, lin.weight, lin.bias))
    for h in hooks:
        h.remove()
    assert torch.allclose(lin(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_a_tiny_run_writes_rows_with_the_gate_and_the_flop_share(tmp_path, capsys):
    fq = _load()
    rc = fq.main(
        ["--weights", "tiny", "--batch", "1", "--rows", "unet: every linear", "--fp16-row"]
        + ["--out", str(tmp_path)]
    )
    assert rc == 0
    rows = [json.loads(r) for r in (tmp_path / "fp8_quality.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == ["both: every conv and linear (fp16)", "unet: every linear"]
    fp16, fp8 = rows
    assert fp16["format"].startswith("fp16") and fp16["flop_share"] == 1.0
    assert fp16["psnr_db"] > fp8["psnr_db"] and fp16["passed"]  # fp16 operands lose far less
    assert 0.0 < fp8["flop_share"] < 1.0 and fp8["layers"] > 0 and "torch" in fp8
    # the fp16 row takes every layer a frame runs through: the shares are of that whole
    assert fp16["layers"] > fp8["layers"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fp8_quality"] == 2 and summary["gate_db"] == 40.0
    with pytest.raises(SystemExit):
        fq.main(["--weights", "tiny", "--rows", "no such row"])
