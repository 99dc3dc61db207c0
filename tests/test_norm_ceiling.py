"""experiments/norm_ceiling.py: each variant removes what it says, and the probe runs on CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import load_experiment
from torch import nn

from musetalk_rt.engines.rewrites import ChannelsLastGroupNorm
from musetalk_rt.weights import load_models


@pytest.fixture(scope="module")
def vae():
    return load_models("tiny", "models", torch.device("cpu")).vae


def _decode(v, z):  # [B, 4, h, w] -> [B, 3, H, W]
    with torch.no_grad():
        return v.decode(z).sample


def test_each_variant_rewrites_the_decoder_only(vae):
    nc = load_experiment("norm_ceiling")
    norms = sum(type(m) is nn.GroupNorm for m in vae.decoder.modules())
    silus = sum(type(m) is nn.SiLU for m in vae.decoder.modules())
    encoder_norms = sum(type(m) is nn.GroupNorm for m in vae.encoder.modules())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    as_is = copy.deepcopy(vae)
    assert nc.strip(as_is, "as_is") == 0 and torch.equal(_decode(as_is, z), _decode(vae, z))

    affine = copy.deepcopy(vae)
    assert nc.strip(affine, "affine_only") == norms > 0
    kinds = [type(m).__name__ for m in affine.decoder.modules()]
    assert "GroupNorm" not in kinds and kinds.count("Affine") == norms
    # the per-channel scale and shift of the norm it replaced, without its statistics
    first = next(m for m in affine.decoder.modules() if type(m).__name__ == "Affine")
    x = torch.randn(2, first.weight.numel(), 3, 3)
    expected = x * first.weight.view(1, -1, 1, 1) + first.bias.view(1, -1, 1, 1)
    assert torch.equal(first(x), expected)
    assert first(x[..., 0]).shape == x[..., 0].shape  # the attention's [B, C, L] input too

    plain = copy.deepcopy(vae)
    assert nc.strip(plain, "no_norm") == norms
    assert not any(type(m) is nn.GroupNorm for m in plain.decoder.modules())

    bare = copy.deepcopy(vae)
    assert nc.strip(bare, "no_norm_no_silu") == norms + silus > norms
    assert not any(type(m) in (nn.GroupNorm, nn.SiLU) for m in bare.decoder.modules())
    for variant, form in nc.STATS.items():  # the norm's statistics in another form
        other = copy.deepcopy(vae)
        assert nc.strip(other, variant) == norms
        swapped = [m for m in other.decoder.modules() if isinstance(m, ChannelsLastGroupNorm)]
        assert len(swapped) == norms and {m.stats for m in swapped} == {form}
        torch.testing.assert_close(_decode(other, z), _decode(vae, z), rtol=1e-4, atol=1e-4)
    for v in (affine, plain, bare):  # the encoder is left alone; the decoder still decodes
        assert sum(type(m) is nn.GroupNorm for m in v.encoder.modules()) == encoder_norms
        assert _decode(v, z).shape == _decode(vae, z).shape


def test_the_probe_runs_on_cpu_and_ends_with_one_json_line(tmp_path, capsys):
    nc = load_experiment("norm_ceiling")
    argv = ["--engine", "eager", "--weights", "tiny", "--device", "cpu", "--dtype", "fp32"]
    assert nc.main([*argv, "--batch-sizes", "1,2", "--iters", "2", "--out", str(tmp_path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["norm_ceiling"]) == {f"{v}_b{b}" for v in nc.CEILINGS for b in (1, 2)}
    rows = [json.loads(r) for r in (tmp_path / "norm_ceiling.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["batch"]) for r in rows] == [
        (v, b) for v in nc.CEILINGS for b in (1, 2)
    ]
    assert all(r["vae_decode_p50_ms"] > 0 for r in rows)
    # a statistics variant, with its chunk size recorded
    stats_argv = [*argv, "--batch-sizes", "1", "--iters", "2", "--variants", "stats_split_sums"]
    assert nc.main([*stats_argv, "--split-pixels", "16", "--out", str(tmp_path / "s")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last["norm_ceiling"]) == {"stats_split_sums_b1"}
    row = json.loads((tmp_path / "s" / "norm_ceiling.jsonl").read_text())
    assert (row["variant"], row["norm_stats"], row["split_pixels"]) == (
        "stats_split_sums",
        "split_sums",
        16,
    )


def test_rows_name_the_statistics_each_variant_used():
    nc = load_experiment("norm_ceiling")
    assert nc.norm_stats("as_is", True, 16) == {"norm_stats": "split", "split_pixels": 256}
    assert nc.norm_stats("as_is", False, 16) == {"norm_stats": "library", "split_pixels": None}
    assert nc.norm_stats("stats_welford", True, 16) == {
        "norm_stats": "welford",
        "split_pixels": None,
    }
    assert nc.norm_stats("stats_split", False, 64) == {"norm_stats": "split", "split_pixels": 64}
    assert nc.norm_stats("no_norm", True, 16) == {"norm_stats": None, "split_pixels": None}


def test_bad_input_is_one_clear_line(capsys):
    nc = load_experiment("norm_ceiling")
    with pytest.raises(SystemExit) as e:
        nc.main(["--split-pixels", "0", "--device", "cpu"])
    assert e.value.code == 2 and "--split-pixels must be at least 1, not 0" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as e:
        nc.main(["--variants", "as_is,no_conv", "--device", "cpu"])
    assert e.value.code == 2 and "unknown variants ['no_conv']" in capsys.readouterr().err
    # an engine that cannot run: its reason and fix, no traceback
    assert nc.main(["--engine", "eager", "--weights", "tiny", "--device", "cpu"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --dtype fp32 or bf16" in err[0]
