"""Prepare an avatar from a video or an image: frames, boxes, latents and blending masks.

The manifest records everything the materials depend on (source hash, settings, weights
fingerprint, versions); preparing again with the same inputs reuses the folder, any change
rebuilds it, ``force`` always rebuilds. Nothing ever prompts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

import musetalk_rt
from musetalk_rt.avatar.geometry import (
    EXPAND,
    EXTRA_MARGIN_PX,
    UPPER_BOUNDARY_RATIO,
    Box,
    clip_box,
    crop_box_for,
    default_box,
    extend_v15,
    lower_face_mask,
    validate_box,
)
from musetalk_rt.avatar.store import FORMAT_VERSION, MODEL_VERSION
from musetalk_rt.errors import UserError
from musetalk_rt.modeling import VaeEncoder
from musetalk_rt.modeling.configs import FACE_SIZE
from musetalk_rt.weights import sha256_file

ENCODE_BATCH = 16


def _valid_id(avatar_id: str) -> str:
    ok = avatar_id and all(c.isalnum() or c in "-_." for c in avatar_id)
    if not ok or avatar_id.startswith("."):
        raise UserError(f"avatar id {avatar_id!r} must use letters, digits, '-', '_' or '.'")
    return avatar_id


def face_crop(frame: np.ndarray, box: Box) -> np.ndarray:
    """The 256x256 RGB face crop of a frame (Lanczos), as MuseTalk makes it."""
    crop = frame[box.y1 : box.y2, box.x1 : box.x2]
    return cv2.resize(crop, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LANCZOS4)


@torch.inference_mode()
def encode_faces(vae: torch.nn.Module, faces: list[np.ndarray], seed: int = 0) -> torch.Tensor:
    """VAE-encode 256x256 faces in batches to ``[N, 8, 32, 32]`` float32 latents (CPU)."""
    encoder = VaeEncoder(vae)
    device = next(vae.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same latents on any device
    out = []
    for i in range(0, len(faces), ENCODE_BATCH):
        batch = torch.from_numpy(np.stack(faces[i : i + ENCODE_BATCH])).to(device)
        out.append(encoder(batch, generator=gen).float().cpu())
    return torch.cat(out)


def prepare_avatar(
    source: str | Path,
    avatar_id: str,
    models,
    avatars_dir: str | Path = "avatars",
    bbox: Box | None = None,
    extra_margin: int = EXTRA_MARGIN_PX,
    max_frames: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Prepare (or reuse) an avatar.

    Args:
        source: A video or an image file.
        avatar_id: Folder name under ``avatars_dir``.
        models: Loaded :class:`musetalk_rt.weights.Models` (its VAE encodes the latents).
        avatars_dir: Where avatars live.
        bbox: Face box in source pixels; default a centred square.
        extra_margin: v1.5's downward extension of the box, px.
        max_frames: Use at most this many frames of a video.
        force: Rebuild even when the manifest says the folder is up to date.
        log: Progress lines go here.

    Returns:
        The avatar's folder.

    Raises:
        UserError: Unreadable source, a box outside the frame, a bad id.
    """
    from musetalk_rt.media import load_source

    _valid_id(avatar_id)
    source = Path(source)
    if not source.is_file():
        raise UserError(f"source {source} does not exist or is not a file")
    root = Path(avatars_dir)
    target = root / avatar_id
    settings = {
        "bbox": bbox.as_list() if bbox else None,
        "extra_margin": extra_margin,
        "expand": EXPAND,
        "upper_boundary_ratio": UPPER_BOUNDARY_RATIO,
        "max_frames": max_frames,
        "mask": "ellipse-in-box",
    }
    digest = sha256_file(source)
    wanted = {
        "format": FORMAT_VERSION,
        "model": MODEL_VERSION,
        "settings": settings,
        "source_sha256": digest,
        "weights": models.fingerprint,
    }
    old = target / "manifest.json"
    if old.is_file() and not force:
        try:
            m = json.loads(old.read_text())
            have = {
                "format": m.get("format"),
                "model": m.get("model"),
                "settings": m.get("settings"),
                "source_sha256": m["source"]["sha256"],
                "weights": m["weights"]["fingerprint"],
            }
        except (ValueError, KeyError, TypeError):
            have = None
        if have == wanted:
            log(f"avatar {avatar_id!r} is up to date ({target})")
            return target
        changed = [k for k in wanted if have is None or have.get(k) != wanted[k]]
        log(f"avatar {avatar_id!r} changed ({', '.join(changed)}): rebuilding")

    t0 = time.perf_counter()
    frames, fps = load_source(source)
    if max_frames:
        frames = frames[:max_frames]
    h, w = frames[0].shape[:2]
    given = validate_box(bbox, w, h) if bbox else default_box(w, h)
    box = extend_v15(given, h, extra_margin)
    crop = crop_box_for(box)
    clipped = clip_box(crop, w, h)
    full_mask = lower_face_mask(box, crop)
    mask = full_mask[
        clipped.y1 - crop.y1 : clipped.y2 - crop.y1, clipped.x1 - crop.x1 : clipped.x2 - crop.x1
    ]
    faces = [face_crop(f, box) for f in frames]
    log(f"encoding {len(faces)} face crops with the VAE ({models.kind} weights)")
    latents = encode_faces(models.vae, faces)  # [N, 8, 32, 32]

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{avatar_id}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "frames").mkdir(parents=True)
        (tmp / "masks").mkdir()
        png = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        for i, f in enumerate(frames):
            cv2.imwrite(
                str(tmp / "frames" / f"{i:06d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR), png
            )
            cv2.imwrite(str(tmp / "masks" / f"{i:06d}.png"), mask, png)
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
        geometry = {
            "boxes": [box.as_list()] * len(frames),
            "crops": [clipped.as_list()] * len(frames),
        }
        (tmp / "geometry.json").write_text(json.dumps(geometry))
        manifest = {
            "format": FORMAT_VERSION,
            "model": MODEL_VERSION,
            "id": avatar_id,
            "num_frames": len(frames),
            "fps": fps,
            "width": w,
            "height": h,
            "source": {"path": str(source), "sha256": digest},
            "settings": settings,
            "box_source": "given" if bbox else "centred default",
            "weights": {"kind": models.kind, "fingerprint": models.fingerprint},
            "versions": {"musetalk_rt": musetalk_rt.__version__, "torch": torch.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            trash = root / f".{avatar_id}.old-{os.getpid()}"
            target.rename(trash)
            tmp.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(
        f"avatar {avatar_id!r}: {len(frames)} frames, box {box.as_list()}, "
        f"{time.perf_counter() - t0:.1f} s -> {target}"
    )
    return target
