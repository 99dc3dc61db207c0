"""MuseTalk maths: positional encoding and the masked-reference latent."""

import math

import torch

from musetalk_rt.modeling import PositionalEncoding, VaeEncoder


def test_positional_encoding_formula():
    pe = PositionalEncoding(384)
    x = torch.zeros(1, 50, 384)
    out = pe(x)[0]
    assert math.isclose(float(out[7, 10]), math.sin(7 / 10000 ** (10 / 384)), rel_tol=1e-5)
    assert math.isclose(float(out[7, 11]), math.cos(7 / 10000 ** (10 / 384)), rel_tol=1e-5)


def test_masked_latent_ignores_lower_half(tiny_models):
    enc = VaeEncoder(tiny_models.vae)
    g = torch.Generator().manual_seed(0)
    faces = torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8, generator=g)
    changed = faces.clone()
    changed[:, 128:] = 255 - changed[:, 128:]  # only the lower half differs
    with torch.no_grad():
        a = enc(faces, generator=torch.Generator().manual_seed(1))
        b = enc(changed, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 8, 32, 32)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # masked reference: identical
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3  # unmasked reference sees the change
