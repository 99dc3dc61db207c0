"""On-disk avatar materials and their loader.

Layout of ``<avatars_dir>/<id>/`` (no pickles anywhere)::

    manifest.json        source hash, settings, weights fingerprint, versions, detection report
    geometry.json        per-frame face box, (clipped) crop box, 68 landmarks and mouth
                         openness (when found automatically), and the idle cycle's frame range
    frames/000000.png    the source frames, RGB, lossless
    masks/000000.png     per-frame feathered mask of the crop box
    latents.safetensors  "latents": [N, 8, 32, 32] float32 UNet input latents

A folder is written under a temporary name and renamed into place only when complete, so a
half-written avatar never looks valid.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from musetalk_rt.avatar.geometry import Box
from musetalk_rt.errors import UserError

FORMAT_VERSION = 2
MODEL_VERSION = "musetalk-v1.5"


def cycle_index(frame: int, num_frames: int) -> int:
    """Ping-pong cycle: frames 0..N-1 then N-1..0, so the idle loop never jumps."""
    i = frame % (2 * num_frames)
    return i if i < num_frames else 2 * num_frames - 1 - i


@dataclass
class Avatar:
    """Loaded avatar materials.

    Attributes:
        avatar_id: Its name.
        frames: N full frames, ``[H, W, 3]`` uint8 RGB.
        boxes: Per-frame face boxes (v1.5-extended).
        crops: Per-frame crop boxes, clipped to the frame.
        masks: Per-frame masks, ``[crop.height, crop.width]`` uint8.
        latents: ``[N, 8, 32, 32]`` float32 UNet input latents (CPU; move once).
        manifest: The manifest dict.
        geometry: The geometry dict (landmarks, mouth openness, cycle).
    """

    avatar_id: str
    frames: list[np.ndarray]
    boxes: list[Box]
    crops: list[Box]
    masks: list[np.ndarray]
    latents: torch.Tensor
    manifest: dict
    geometry: dict

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def cycle(self) -> tuple[int, int]:
        """The idle cycle's frames ``[start, end)`` (all frames unless prepared otherwise)."""
        start, end = self.geometry.get("cycle") or (0, self.num_frames)
        return int(start), int(end)

    def cycle_frame(self, frame: int) -> int:
        """The avatar frame shown at output frame ``frame`` (ping-pong over the cycle)."""
        start, end = self.cycle
        return start + cycle_index(frame, end - start)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the frames."""
        h, w = self.frames[0].shape[:2]
        return w, h


def valid_id(avatar_id: str) -> str:
    """An avatar id as a folder name: letters, digits, ``-``, ``_``, ``.``; not hidden.

    Raises:
        UserError: Anything else (``../x`` would read or write outside the avatars folder).
    """
    ok = avatar_id and all(c.isalnum() or c in "-_." for c in avatar_id)
    if not ok or avatar_id.startswith("."):
        raise UserError(f"avatar id {avatar_id!r} must use letters, digits, '-', '_' or '.'")
    return avatar_id


def prepare_command(avatar_id: str, avatars_dir: str | Path = "avatars", force=False) -> str:
    """The ``musetalk-rt avatar prepare`` line that (re)builds an avatar, ready to paste."""
    words = ["musetalk-rt", "avatar", "prepare", "--source", "VIDEO_OR_IMAGE", "--id", avatar_id]
    if Path(avatars_dir) != Path("avatars"):
        words += ["--avatars-dir", str(avatars_dir)]
    return shlex.join(words + (["--force"] if force else []))


def _png(path: Path, fix: str) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"avatar file {path} is missing or unreadable; run `{fix}`")
    return img


def load_avatar(avatar_id: str, avatars_dir: str | Path = "avatars") -> Avatar:
    """Load a prepared avatar.

    Raises:
        UserError: A bad id, not prepared, damaged or incomplete, or prepared by another
            format/model version; the message holds the command that rebuilds it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    valid_id(avatar_id)
    root = Path(avatars_dir) / avatar_id
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise UserError(
            f"avatar {avatar_id!r} is not prepared in {avatars_dir}; "
            f"run `{prepare_command(avatar_id, avatars_dir)}`"
        )
    fix = prepare_command(avatar_id, avatars_dir, force=True)
    try:
        manifest = json.loads(mpath.read_text())
        geometry = json.loads((root / "geometry.json").read_text())
        if not isinstance(manifest, dict) or not isinstance(geometry, dict):
            raise ValueError("manifest.json and geometry.json must hold JSON objects")
        if manifest.get("format") != FORMAT_VERSION or manifest.get("model") != MODEL_VERSION:
            raise UserError(
                f"avatar {avatar_id!r} was prepared for {manifest.get('model')} format "
                f"{manifest.get('format')}; this version needs {MODEL_VERSION} format "
                f"{FORMAT_VERSION}: run `{fix}`"
            )
        n = int(manifest["num_frames"])
        if n < 1:
            raise ValueError(f"num_frames is {n}")
        frames = [
            cv2.cvtColor(_png(root / "frames" / f"{i:06d}.png", fix), cv2.COLOR_BGR2RGB)
            for i in range(n)
        ]
        masks = [_png(root / "masks" / f"{i:06d}.png", fix) for i in range(n)]
        latents = load_file(str(root / "latents.safetensors"))["latents"]  # [N, 8, 32, 32]
        boxes = [Box(*b) for b in geometry["boxes"]]
        crops = [Box(*b) for b in geometry["crops"]]
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError) as exc:
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UserError(f"avatar {avatar_id!r} is damaged ({reason}); run `{fix}`") from None
    if not (len(boxes) == len(crops) == latents.shape[0] == n):
        raise UserError(f"avatar {avatar_id!r} is inconsistent; run `{fix}`")
    return Avatar(avatar_id, frames, boxes, crops, masks, latents, manifest, geometry)
