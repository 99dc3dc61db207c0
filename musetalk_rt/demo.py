"""``make demo``: the main job end to end on whatever this machine has.

1. Check the real weights; if absent, try to download them; if that fails, say so plainly and
   continue with synthetic weights (full-size, random: the face is noise, the timing is real).
2. Prepare a demo avatar from ``skimage.data.astronaut()`` (a real photograph).
3. Speak a sentence (espeak-ng, or a fixture-free synthetic voice).
4. Render ``out/demo.mp4`` and print the timing summary.

On a CPU-only host the full-size networks cost seconds per frame, so the sentence is short.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import torch

from musetalk_rt import weights
from musetalk_rt.avatar import load_avatar, prepare_avatar
from musetalk_rt.errors import UserError
from musetalk_rt.pipeline import render
from musetalk_rt.testing import speech_wav

LONG_TEXT = "Hello, I am your avatar. Welcome to the show, everyone."
SHORT_TEXT = "Hello everyone."


def run(out_dir: Path = Path("out"), models_dir: Path = Path("models")) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = "real"
    if any(r.status != "ok" for r in weights.check(models_dir)):
        print(f"real MuseTalk weights are not in {models_dir}/; trying to download them …")
        try:
            weights.download(models_dir)
        except UserError as exc:
            print(f"could not get the real weights ({exc}).")
            print(
                "continuing with SYNTHETIC weights: full-size networks with random values; "
                "the face will be noise, the timings are real."
            )
            kind = "synthetic"
    models = weights.load_models(kind, models_dir, device)
    print(models.describe())

    out_dir.mkdir(parents=True, exist_ok=True)
    from skimage import data

    image = out_dir / "astronaut.png"
    cv2.imwrite(str(image), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    avatars = out_dir / "avatars"
    avatar_id = f"astronaut-{kind}"
    from musetalk_rt.avatar import parse_bbox

    prepare_avatar(image, avatar_id, models, avatars, bbox=parse_bbox("180,80,330,280"))
    text = LONG_TEXT if device.type == "cuda" else SHORT_TEXT
    wav, source = speech_wav(out_dir / "demo.wav", text)
    print(f"speech: {source}: {text!r}")
    report = render(
        models,
        load_avatar(avatar_id, avatars),
        wav,
        out_dir / "demo.mp4",
        engine="eager",
        dtype="fp16" if device.type == "cuda" else "fp32",
        batch_size=8,
    )
    print(report.table())
    return 0


def main() -> int:
    try:
        return run()
    except UserError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
