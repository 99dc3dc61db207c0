"""Automatic face tracking, MuseTalk's crop rule, the landmark mask, avatar check."""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest
from skimage import data

from musetalk_rt.avatar import load_avatar, prepare_avatar
from musetalk_rt.avatar.check import box_jitter, check_avatar
from musetalk_rt.avatar.geometry import box_from_landmarks, crop_box_for
from musetalk_rt.avatar.landmarks import (
    EYES,
    MOUTH,
    Face,
    LandmarkDetector,
    get_detector,
    register_detector,
    smooth_paths,
    track_main_face,
)
from musetalk_rt.avatar.prepare import closed_mouth_run
from musetalk_rt.cli import main
from musetalk_rt.errors import UserError
from musetalk_rt.media import load_source

N_FRAMES = 60  # of yongen.mp4: enough for jitter, quick on 2 cores


@pytest.fixture(scope="session")
def yongen_auto(tiny_models, tmp_path_factory, request):
    """yongen.mp4 prepared with no box (landmarks), first 60 frames."""
    from conftest import fixtures_dir

    src = fixtures_dir() / "yongen.mp4"
    if not src.is_file():
        pytest.skip("real media fixtures not found at ../shared/fixtures/")
    avatars = tmp_path_factory.mktemp("auto")
    logs = []
    prepare_avatar(src, "yongen", tiny_models, avatars, max_frames=N_FRAMES, log=logs.append)
    return avatars, logs


def _write_video(path, frames, fps=25):
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(s.encode())


def test_crop_rule_is_musetalks():
    pts = np.zeros((68, 2), np.float32)
    pts[:, 0] = np.linspace(100, 200, 68)
    pts[:, 1] = 150
    pts[29] = (150, 140)  # centre row
    pts[8] = (150, 230)  # lowest point (chin)
    box = box_from_landmarks(pts, 640, 480, extra_margin=10)
    half = 230 - 140
    assert box.as_list() == [100, 140 - half, 200, 230 + 10]
    # clipped: top at 0, bottom margin at the frame's edge
    assert box_from_landmarks(pts, 640, 235).as_list() == [100, 50, 200, 235]


def test_yongen_no_box_jitter_psnr_and_sheet(yongen_auto, tmp_path, capsys):
    avatars, logs = yongen_auto
    a = load_avatar("yongen", avatars)
    assert a.num_frames == N_FRAMES and a.manifest["box_source"] == "landmarks (dlib68)"
    assert a.manifest["report"]["frames_with_face"] == N_FRAMES
    assert "non-commercial" in " ".join(logs)  # the licence of the 68-point model is said
    code = main(
        [
            "avatar",
            "check",
            "yongen",
            "--avatars-dir",
            str(avatars),
            "--sheet",
            str(tmp_path / "sheet.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    rep = json.loads(out.strip().splitlines()[-1])
    assert rep["jitter_median_px"] <= 1.0
    assert rep["identity_psnr_min_db"] >= 40.0
    sheet = cv2.imread(str(tmp_path / "sheet.png"))
    assert sheet is not None and sheet.shape[0] >= 320 and sheet.shape[1] >= 960


def test_mask_covers_mouth_and_jaw_not_eyes_or_background(yongen_auto):
    a = load_avatar("yongen", yongen_auto[0])
    for i in (0, N_FRAMES // 2, N_FRAMES - 1):
        pts = np.asarray(a.geometry["landmarks"][i])
        crop, mask = a.crops[i], a.masks[i]

        def m(x, y, mask=mask, crop=crop):
            return int(mask[int(round(y)) - crop.y1, int(round(x)) - crop.x1])

        assert min(m(x, y) for x, y in pts[MOUTH]) >= 200  # the whole mouth is pasted
        assert m(*pts[8]) >= 128 and m(*pts[4]) >= 128 and m(*pts[12]) >= 128  # chin, jaw
        # below the chin, by a tenth of the face height, still covered: the jaw can drop
        face_h = np.linalg.norm(pts[27] - pts[8])
        assert m(pts[8][0], pts[8][1] + 0.05 * face_h) >= 128
        assert max(m(x, y) for x, y in pts[EYES]) == 0  # eyes untouched
        assert mask[:5].max() == 0 and mask[:, :5].max() == 0  # hair/background corners
        assert mask[-5:, :5].max() == 0 and mask[-5:, -5:].max() == 0


def test_smoothing_removes_jitter_but_keeps_motion():
    rng = np.random.default_rng(0)
    t = np.arange(100)
    path = np.stack([100 + 0.5 * t, 200 + 0 * t], axis=1)[:, None, :].repeat(68, 1)  # slow pan
    noisy = (path + rng.normal(0, 1.0, path.shape)).astype(np.float32)
    smooth = smooth_paths(noisy, 1.5)
    step_noisy = np.abs(np.diff(noisy[:, 0, 1])).mean()
    step_smooth = np.abs(np.diff(smooth[:, 0, 1])).mean()
    assert step_smooth < step_noisy / 3
    assert np.abs(smooth[10:-10, :, 0] - path[10:-10, :, 0]).max() < 1.5  # the pan survives


class _Scripted(LandmarkDetector):
    """A stand-in detector (pluggable interface) that replays faces per frame index."""

    name = "scripted"

    def __init__(self, faces):
        self.faces = faces
        self.i = 0

    def detect(self, frame):
        out = self.faces[self.i]
        self.i += 1
        return out


def _face(x, y, s):
    pts = np.stack([np.linspace(x, x + s, 68), np.full(68, y + s / 2)], axis=1).astype(np.float32)
    pts[29], pts[8] = (x + s / 2, y + s / 2), (x + s / 2, y + s)
    return Face((x, y, x + s, y + s), pts)


def test_tracking_keeps_main_face_and_interpolates_gaps():
    big = [_face(100 + i, 100, 80) for i in range(6)]
    small = _face(10, 10, 20)
    script = [[big[0], small], [small, big[1]], [], [], [big[4]], [big[5], small]]
    register_detector("scripted", lambda: _Scripted(script))
    track = track_main_face([np.zeros((4, 4, 3), np.uint8)] * 6, get_detector("scripted"), 0)
    assert track.detected.tolist() == [True, True, False, False, True, True]
    assert track.interpolated == 2 and track.faces_seen == 2
    assert track.points[:, 29, 0].tolist() == pytest.approx([140, 141, 142, 143, 144, 145])
    with pytest.raises(UserError, match="no face found"):
        register_detector("blind", lambda: _Scripted([[]] * 3))
        track_main_face([np.zeros((4, 4, 3), np.uint8)] * 3, get_detector("blind"))
    with pytest.raises(UserError, match="unknown face detector"):
        get_detector("nope")


def test_astronaut_image_works(tiny_models, tmp_path):
    path = tmp_path / "astronaut.png"
    cv2.imwrite(str(path), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    prepare_avatar(path, "astro", tiny_models, tmp_path, log=lambda _: None)
    a = load_avatar("astro", tmp_path)
    rep = check_avatar(a, tmp_path / "astro.png")
    assert rep.identity_psnr_min_db >= 40.0 and rep.jitter_max_px == 0.0
    assert (tmp_path / "astro.png").is_file()


def test_video_with_faceless_frames_is_interpolated_and_reported(
    tiny_models, fixture_file, tmp_path
):
    frames, _ = load_source(fixture_file("yongen.mp4"))
    frames = frames[:20]
    gray = np.full_like(frames[0], 128)
    for i in range(8, 12):  # 4 frames without a face
        frames[i] = gray
    video = tmp_path / "gaps.mp4"
    _write_video(video, frames)
    logs = []
    prepare_avatar(video, "gaps", tiny_models, tmp_path / "av", log=logs.append)
    a = load_avatar("gaps", tmp_path / "av")
    assert a.manifest["report"]["frames_interpolated"] == 4
    assert "4 interpolated" in " ".join(logs)
    jit = box_jitter(a)
    assert jit.max() < 5  # the gap is bridged smoothly, not with a jump
    crop = crop_box_for(a.boxes[9])
    assert crop.x1 < a.boxes[9].x1 and a.masks[9].max() == 255


def test_closed_mouth_run_and_idle_option(yongen_auto, tiny_models, fixture_file, tmp_path):
    o = np.array([0.05, 0.01, 0.01, 0.01, 0.06, 0.01, 0.01, 0.05])
    assert closed_mouth_run(o) == (1, 4)
    assert closed_mouth_run(np.full(3, 0.1)) == (0, 0)
    logs = []
    prepare_avatar(
        fixture_file("yongen.mp4"),
        "idle",
        tiny_models,
        tmp_path,
        max_frames=40,
        idle="closed",
        log=logs.append,
    )
    a = load_avatar("idle", tmp_path)
    start, end = a.cycle
    assert end - start >= 25
    assert {a.cycle_frame(f) for f in range(200)} <= set(range(start, end))
    with pytest.raises(UserError, match="needs face landmarks"):
        from musetalk_rt.avatar import parse_bbox

        prepare_avatar(
            fixture_file("yongen.mp4"),
            "x",
            tiny_models,
            tmp_path,
            bbox=parse_bbox("250,300,470,560"),
            idle="closed",
        )


def test_bad_sources_one_line_and_nothing_left_behind(tmp_path, capsys):
    noface = tmp_path / "noface.mp4"
    rng = np.random.default_rng(0)
    _write_video(noface, [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(5)])
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(noface.read_bytes()[:300])
    tiny_img = tmp_path / "one.png"
    cv2.imwrite(str(tiny_img), np.zeros((1, 1, 3), np.uint8))
    folder = tmp_path / "a_folder.mp4"
    folder.mkdir()
    avatars = tmp_path / "avatars"
    cases = {
        "no face": (noface, "no face found"),
        "corrupt video": (corrupt, "corrupt.mp4"),
        "1x1 image": (tiny_img, "one.png"),
        "unreadable path": (folder, "not a file"),
    }
    for name, (src, expect) in cases.items():
        code = main(
            [
                "avatar",
                "prepare",
                "--weights",
                "tiny",
                "--avatars-dir",
                str(avatars),
                "--source",
                str(src),
                "--id",
                "bad",
            ]
        )
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and expect in err, (name, err)
    assert not avatars.exists() or not any(avatars.iterdir())  # no half-written folder
