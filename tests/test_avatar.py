"""Avatar preparation, storage, invalidation and blending."""

import json

import cv2
import numpy as np
import pytest
from skimage import data

from musetalk_rt.avatar import load_avatar, parse_bbox, prepare_avatar
from musetalk_rt.avatar.geometry import Box, blend, clip_box, crop_box_for, extend_v15
from musetalk_rt.avatar.store import cycle_index
from musetalk_rt.engines.parity import psnr_u8
from musetalk_rt.errors import UserError


@pytest.fixture
def astronaut(tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


def test_prepare_image_found_box_and_reuse(tiny_models, astronaut, tmp_path):
    avatars = tmp_path / "avatars"
    logs = []
    prepare_avatar(astronaut, "astro", tiny_models, avatars, log=logs.append)
    a = load_avatar("astro", avatars)
    assert a.num_frames == 1 and a.size == (512, 512)
    assert a.latents.shape == (1, 8, 32, 32)
    assert a.manifest["box_source"] == "landmarks (dlib68)"
    x1, y1, x2, y2 = a.boxes[0].as_list()
    assert 150 < x1 < 220 and 30 < y1 < 140 and 250 < x2 < 330 and 160 < y2 < 300  # her face
    logs.clear()
    prepare_avatar(astronaut, "astro", tiny_models, avatars, log=logs.append)
    assert "up to date" in logs[0]
    prepare_avatar(
        astronaut, "astro", tiny_models, avatars, bbox=parse_bbox("180,80,330,280"), log=logs.append
    )
    assert "rebuilding" in logs[1] and "settings" in logs[1]
    assert load_avatar("astro", avatars).boxes[0].as_list() == [180, 80, 330, 290]
    assert not [p for p in avatars.iterdir() if p.name.startswith(".")]  # no leftovers


def test_prepare_video_fixture(yongen_avatar):
    a = load_avatar("yongen", yongen_avatar)
    assert a.num_frames == 268 and a.size == (704, 1216)
    assert a.latents.shape == (268, 8, 32, 32)
    assert a.masks[0].shape == (a.crops[0].height, a.crops[0].width)


def test_identity_round_trip_of_blend(yongen_avatar):
    """Pasting a frame's own 256x256 crop back must reproduce the frame almost exactly."""
    a = load_avatar("yongen", yongen_avatar)
    i = 100
    box = a.boxes[i]
    crop = cv2.resize(
        a.frames[i][box.y1 : box.y2, box.x1 : box.x2], (256, 256), interpolation=cv2.INTER_LANCZOS4
    )
    out = blend(a.frames[i], crop, box, a.crops[i], a.masks[i])
    import torch

    psnr = psnr_u8(torch.from_numpy(a.frames[i]), torch.from_numpy(out))
    assert psnr > 30  # resampling twice costs a little; geometry errors would cost far more
    # Outside the crop box nothing changes; above the mask's cut (0.5 of the crop box height,
    # less the feathering kernel) the frame is untouched.
    c = a.crops[i]
    k = int(0.05 * c.width // 2 * 2) + 1
    top = c.y1 + c.height // 2 - k
    assert np.array_equal(out[:top], a.frames[i][:top])
    assert np.array_equal(out[c.y2 :], a.frames[i][c.y2 :])


def test_box_outside_frame_and_bad_inputs(tiny_models, astronaut, tmp_path):
    with pytest.raises(UserError, match="outside the 512x512 frame"):
        prepare_avatar(astronaut, "x", tiny_models, tmp_path, bbox=parse_bbox("400,400,600,600"))
    with pytest.raises(UserError, match="four integers"):
        parse_bbox("1,2,3")
    with pytest.raises(UserError, match="letters"):
        prepare_avatar(astronaut, "../evil", tiny_models, tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        prepare_avatar(tmp_path / "nope.mp4", "x", tiny_models, tmp_path)
    assert not (tmp_path / "x").exists()


def test_failed_prepare_leaves_no_valid_looking_folder(tiny_models, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(UserError):
        prepare_avatar(bad, "broken", tiny_models, tmp_path / "avatars")
    avatars = tmp_path / "avatars"
    assert not avatars.exists() or not any(avatars.iterdir())
    with pytest.raises(UserError, match="not prepared"):
        load_avatar("broken", avatars)


def test_a_damaged_avatar_is_one_line_with_the_command_that_rebuilds_it(
    tiny_models, astronaut, tmp_path
):
    """Any missing or broken file of a prepared folder is "damaged" and names the command,
    its non-default --avatars-dir included; prepare does not call such a folder up to date."""
    import shutil

    avatars = tmp_path / "my avatars"
    prepare_avatar(astronaut, "astro", tiny_models, avatars, log=lambda _: None)
    good = tmp_path / "good"
    shutil.copytree(avatars / "astro", good)

    def damage(edit):
        shutil.rmtree(avatars / "astro")
        shutil.copytree(good, avatars / "astro")
        edit(avatars / "astro")
        with pytest.raises(UserError) as err:
            load_avatar("astro", avatars)
        msg = str(err.value)
        assert "--force" in msg and f"--avatars-dir '{avatars}'" in msg, msg
        return msg

    assert "damaged" in damage(lambda d: (d / "latents.safetensors").unlink())
    assert "damaged" in damage(lambda d: (d / "latents.safetensors").write_bytes(b"junk"))
    assert "missing or unreadable" in damage(lambda d: (d / "masks" / "000000.png").unlink())

    def no_frames(d):
        m = json.loads((d / "manifest.json").read_text())
        m["num_frames"] = 0
        (d / "manifest.json").write_text(json.dumps(m))

    assert "damaged" in damage(no_frames)
    assert "damaged" in damage(lambda d: (d / "geometry.json").write_text('{"boxes": []}'))
    # prepare sees the missing latents and rebuilds instead of calling it up to date
    (avatars / "astro" / "latents.safetensors").unlink()
    logs = []
    prepare_avatar(astronaut, "astro", tiny_models, avatars, log=logs.append)
    assert "rebuilding" in logs[0] and "files" in logs[0]
    assert load_avatar("astro", avatars).num_frames == 1


def test_a_killed_prepare_leaves_nothing_after_the_next_one(tiny_models, astronaut, tmp_path):
    """A prepare killed mid-write leaves its temporary folder; the next prepare of that id
    removes it (a folder of a process still running is another prepare's: kept)."""
    import subprocess
    import sys

    avatars = tmp_path / "avatars"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = avatars / f".astro.partial-{dead}"
    (stale / "frames").mkdir(parents=True)
    running = avatars / ".astro.partial-1"  # pid 1 runs: someone else's prepare
    running.mkdir()
    other = avatars / f".other.partial-{dead}"  # another avatar's: not this prepare's business
    other.mkdir()
    prepare_avatar(astronaut, "astro", tiny_models, avatars, log=lambda _: None)
    assert not stale.exists() and running.exists() and other.exists()


def test_max_frames_stops_decoding(fixtures):
    """--max-frames stops the decoder, not a cut after decoding a whole (long) video."""
    from musetalk_rt.media import load_source

    frames, fps = load_source(fixtures / "yongen.mp4", max_frames=3)
    assert len(frames) == 3 and fps == 25.0


def test_other_format_version_is_refused(tiny_models, astronaut, tmp_path):
    prepare_avatar(astronaut, "old", tiny_models, tmp_path, log=lambda _: None)
    m = tmp_path / "old" / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["model"] = "musetalk-v1.0"
    m.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="--force"):
        load_avatar("old", tmp_path)


def test_ping_pong_cycle_and_geometry():
    assert [cycle_index(f, 3) for f in range(8)] == [0, 1, 2, 2, 1, 0, 0, 1]
    assert [cycle_index(f, 1) for f in range(3)] == [0, 0, 0]
    box = extend_v15(parse_bbox("10,10,110,90"), frame_height=95)
    assert box.y2 == 95  # +10 px clipped to the frame
    crop = crop_box_for(box)
    assert crop.width == crop.height == 2 * int(100 // 2 * 1.5)


def _blend_whole_crop(frame, face, box, crop, mask):
    """The blend over the whole crop box: the reference for the bounded one."""
    out = frame.copy()
    resized = cv2.resize(face, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
    region = out[crop.y1 : crop.y2, crop.x1 : crop.x2]
    pasted = region.copy()
    pasted[box.y1 - crop.y1 : box.y2 - crop.y1, box.x1 - crop.x1 : box.x2 - crop.x1] = resized
    alpha = mask.astype(np.float32) / 255.0
    region[:] = cv2.blendLinear(pasted, region, alpha, 1.0 - alpha)
    return out


def _assert_same_blend(frame, face, box, crop, mask):
    got = blend(frame, face, box, crop, mask)
    want = _blend_whole_crop(frame, face, box, crop, mask)
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1
    # which pixels fall in the scalar tail depends on the CPU's vector width: a few, not 1e-5
    assert np.count_nonzero(diff) <= max(8, diff.size // 100_000)
    outside = np.ones(frame.shape[:2], bool)
    x, y, w, h = cv2.boundingRect(mask)
    outside[crop.y1 + y : crop.y1 + y + h, crop.x1 + x : crop.x1 + x + w] = False
    assert np.array_equal(got[outside], frame[outside])


def test_blend_refuses_a_mask_that_does_not_fit_the_crop():
    frame = np.zeros((300, 280, 3), np.uint8)
    face = np.zeros((256, 256, 3), np.uint8)
    box, crop = Box(60, 50, 220, 250), Box(20, 10, 260, 290)
    for mask in (np.zeros((10, 10), np.uint8), np.zeros((280, 240), np.float32)):
        with pytest.raises(ValueError, match="prepare the avatar again"):
            blend(frame, face, box, crop, mask)


def test_blend_over_the_masks_bounding_box_equals_the_whole_crop(yongen_avatar):
    """Blending only where the mask is non-zero gives the whole crop's result: the prepared
    fixture's masks, crops clipped at the frame's edges, masks with scattered and no non-zero
    pixels. Outside the mask's box every pixel is the frame's; inside, a value may be one level
    apart where OpenCV's vector loop and its scalar tail round a weight differently."""
    rng = np.random.default_rng(3)
    a = load_avatar("yongen", yongen_avatar)
    for i in (0, len(a.frames) // 2, len(a.frames) - 1):
        face = rng.integers(0, 256, (256, 256, 3), np.uint8)
        _assert_same_blend(a.frames[i], face, a.boxes[i], a.crops[i], a.masks[i])
    h, w = 240, 200
    for _ in range(40):
        frame = rng.integers(0, 256, (h, w, 3), np.uint8)
        face = rng.integers(0, 256, (256, 256, 3), np.uint8)
        x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = Box(x1, y1, int(rng.integers(x1 + 8, w + 1)), int(rng.integers(y1 + 8, h + 1)))
        crop = clip_box(crop_box_for(box), w, h)
        mask = np.zeros((crop.height, crop.width), np.uint8)
        kind = rng.integers(0, 3)
        if kind == 1:  # a few scattered weights
            ys = rng.integers(0, crop.height, 5)
            xs = rng.integers(0, crop.width, 5)
            mask[ys, xs] = rng.integers(1, 256, 5)
        elif kind == 2:
            mask[crop.height // 2 :] = rng.integers(
                0, 256, (crop.height - crop.height // 2, crop.width)
            )
        _assert_same_blend(frame, face, box, crop, mask)


def test_blend_is_the_mask_weighted_mix_within_one_level():
    """OpenCV's blendLinear against the formula: ``face * m/255 + frame * (1 - m/255)``."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (300, 280, 3), np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), np.uint8)
    box, crop = Box(60, 50, 220, 250), Box(20, 10, 260, 290)
    mask = rng.integers(0, 256, (crop.height, crop.width), np.uint8)
    mask[:40] = 0  # untouched rows
    mask[-30:] = 255  # the face alone
    out = blend(frame, face, box, crop, mask)
    resized = cv2.resize(face, (box.width, box.height), interpolation=cv2.INTER_LINEAR)
    pasted = frame[crop.y1 : crop.y2, crop.x1 : crop.x2].astype(np.float64)
    pasted[box.y1 - crop.y1 : box.y2 - crop.y1, box.x1 - crop.x1 : box.x2 - crop.x1] = resized
    a = mask[..., None] / 255.0
    want = pasted * a + frame[crop.y1 : crop.y2, crop.x1 : crop.x2] * (1 - a)
    got = out[crop.y1 : crop.y2, crop.x1 : crop.x2].astype(np.float64)
    assert np.abs(got - want).max() <= 1.0
    assert np.array_equal(out[crop.y1 : crop.y1 + 40], frame[crop.y1 : crop.y1 + 40])
    bottom = slice(crop.y2 - 30, crop.y2)
    assert np.array_equal(out[bottom, crop.x1 : crop.x2], np.rint(want[-30:]).astype(np.uint8))
    assert np.array_equal(out[: crop.y1], frame[: crop.y1])  # outside the crop: the frame
    assert not np.shares_memory(out, frame)
