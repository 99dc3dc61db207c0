"""The end-to-end probe: markers, onset detection, per-marker analysis, GPU figures, the probe
command on the CPU against a real nginx-rtmp (structure only: timings are the guard's business,
see ``make e2e-guard``), and nginx unpacked from .deb files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from musetalk_rt.e2e.analysis import (
    AudioPiece,
    SentMarker,
    VideoPiece,
    drift,
    evaluate_marker,
    find_gpu_figures,
    gpu_substitute,
    soak_figures,
    stats,
    summarize,
    verdict,
)
from musetalk_rt.e2e.markers import (
    MarkerPlan,
    default_speech,
    detect_onsets,
    marker_snippet,
)
from musetalk_rt.live.app import delay_slack_s
from musetalk_rt.live.drift import shift_at_for_slack
from musetalk_rt.live.framelog import FrameLog
from musetalk_rt.testing import synthetic_voice
from musetalk_rt.testing.rtmp import MODULE_ENV, NGINX_ENV, rtmp_available, unpack_debs

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    return env


# -- markers ---------------------------------------------------------------------------------------


def test_onsets_after_silence_only():
    rng = np.random.default_rng(0)
    x = np.zeros(16000 * 4, np.float32)
    x[16000:20000] = 0.3 * rng.standard_normal(4000)  # after 1 s of silence: an onset
    x[22000:24000] = 0.3 * rng.standard_normal(2000)  # 0.125 s later: too little silence
    x[40000:42000] = 0.3 * rng.standard_normal(2000)  # after 1 s again
    assert detect_onsets(x, min_silence_s=0.5) == [16000, 40000]
    x[0:100] = 0.5  # sound at the very start is not an onset after silence
    assert detect_onsets(x, min_silence_s=0.5)[0] == 16000


def test_marker_snippet_starts_loud_and_is_bounded():
    voice = np.concatenate([np.zeros(3000, np.float32), synthetic_voice(3.0)])
    snip = marker_snippet(voice, max_s=1.5)
    assert len(snip) == 24000 and abs(np.abs(snip).max() - 0.5) < 1e-3
    assert detect_onsets(np.concatenate([np.zeros(16000, np.float32), snip])) == [16000]
    assert snip[-1] == 0.0  # faded out
    with pytest.raises(ValueError):
        marker_snippet(np.zeros(1000, np.float32))


def test_bundled_marker_is_heard_as_speech_from_its_first_frame():
    from musetalk_rt.audio.vad import VoiceActivity, load_silero_vad

    speech, _ = default_speech()
    snip = marker_snippet(speech)
    assert len(snip) == 24000
    x = np.concatenate([np.zeros(32000, np.float32), snip, np.zeros(32000, np.float32)])
    vad = VoiceActivity(load_silero_vad())
    for i in range(0, len(x), 320):
        vad.push(x[i : i + 320])
    vad.finish()
    talk = [vad.is_speech((f + 0.5) * 40.0) for f in range(len(x) // 640)]
    assert talk.index(True) == 50  # the onset's own frame (2 s of silence = 50 frames)
    assert sum(talk) >= 30  # most of the 1.5 s (37 frames) is speech


def test_marker_plan_chunks_equal_the_whole_and_sit_on_frames():
    snip = marker_snippet(synthetic_voice(2.0), max_s=1.0)
    plan = MarkerPlan(snip, period_s=2.5, lead_s=2.0, duration_s=10.0)
    assert plan.count == 3  # onsets at 2.0, 4.5, 7.0 s; a fourth would end after 10 s
    assert all(plan.onset(k) % 640 == 0 for k in range(plan.count))
    whole = plan.samples(0, plan.total_samples)
    chunked = np.concatenate([plan.samples(i, i + 320) for i in range(0, plan.total_samples, 320)])[
        : plan.total_samples
    ]
    np.testing.assert_array_equal(whole, chunked)
    onsets = detect_onsets(whole)
    assert onsets == [plan.onset(k) for k in range(3)]
    with pytest.raises(ValueError):
        MarkerPlan(snip, period_s=1.5, lead_s=2.0, duration_s=10.0)  # no second of silence


# -- analysis --------------------------------------------------------------------------------------


def _captured(lips_after_frames: int, shift_s: float = 0.064):
    """Synthetic captures of one marker: onset at sender sample 64000 (frame base + 100)."""
    base, index0 = 7, 50  # the media frame of writer index 0 is base + 100 - 50
    m = base + 100
    t_voice = 1000.0
    frames = {}
    for n in range(m - 60, m + 60):
        k = n - m + index0
        frames[n] = {
            "frame": n,
            "index": k,
            "writer": 1,
            "kind": "speech" if n >= m + lips_after_frames else "idle",
            "arrival": t_voice + 0.03 + (n - m) * 0.04,
            "written": t_voice + 2.0 + (n - m) * 0.04,
        }
    audio = []
    for i in range(60):  # 1024-sample AAC frames; the onset at writer sample index0 * 640
        pts = i * 1024 / 16000 + shift_s
        s = np.zeros(1024, np.float32)
        start = index0 * 640 - i * 1024
        if start < 1024:
            s[max(0, start) :] = 0.3
        audio.append(AudioPiece(pts, s, t_voice + 1.5 + i * 0.064))
    video = []
    for k in range(index0 - 20, index0 + 30):
        moved = k >= index0 + lips_after_frames
        crop = np.full((8, 8), 100 + (40 if moved else 1), np.uint8)
        video.append(VideoPiece(k / 25 + shift_s, crop, t_voice + 2.1 + (k - index0) * 0.04))
    marker = SentMarker(0, 64000, t_voice)
    return marker, base, frames, audio, video


def _reference(n):
    return np.full((8, 8), 100, np.float32)


@pytest.mark.parametrize("after", [0, 1])
def test_evaluate_marker_breakdown(after):
    marker, base, frames, audio, video = _captured(after)
    row = evaluate_marker(marker, base, frames, audio, video, _reference, 4.0, 4.0)
    assert row["status"] == "ok", row
    assert row["lips_frames_after_onset"] == after
    assert row["av_offset_ms"] == pytest.approx(40.0 * after, abs=3)
    assert row["voice_to_server_ms"] == pytest.approx(30.0)
    assert row["server_to_encoded_ms"] == pytest.approx(2000 - 30 + 40 * after, abs=0.2)
    assert row["encoded_to_received_ms"] == pytest.approx(100.0, abs=0.2)
    total = sum(row[k] for k in ("voice_to_server_ms", "server_to_encoded_ms"))
    assert row["voice_to_received_ms"] == pytest.approx(total + 100.0, abs=0.3)
    assert row["idle_diff_max"] == 1.0


def test_evaluate_marker_says_what_is_missing():
    marker, base, frames, audio, video = _captured(0)
    silent = [AudioPiece(a.pts_s, np.zeros_like(a.samples), a.t_arrival) for a in audio]
    assert evaluate_marker(marker, base, frames, silent, video, _reference, 4.0, 4.0)[
        "status"
    ].startswith("no audio onset")
    still = [VideoPiece(v.pts_s, np.full_like(v.crop, 100), v.t_arrival) for v in video]
    assert evaluate_marker(marker, base, frames, audio, still, _reference, 4.0, 4.0)[
        "status"
    ].startswith("lips never")
    assert evaluate_marker(marker, base, {}, audio, video, _reference, 4.0, 4.0)[
        "status"
    ].startswith("no frame record")


def test_summary_substitution_and_verdict():
    rows = [
        {
            "status": "ok",
            "voice_to_server_ms": 20.0,
            "server_to_encoded_ms": 2000.0 + i,
            "voice_to_encoded_ms": 2020.0 + i,
            "encoded_to_received_ms": 200.0,
            "voice_to_received_ms": 2220.0 + i,
            "voice_to_heard_ms": 2150.0,
            "av_offset_ms": 40.0 if i == 3 else 0.0,
        }
        for i in range(10)
    ] + [{"status": "lips never left the idle frame"}]
    s = summarize(rows)
    assert s["markers"] == 11 and s["found"] == 10
    assert s["voice_to_received_ms"]["p50"] == 2224.0 and s["av_offset_abs_max_ms"] == 40.0
    gpu = gpu_substitute(rows, cpu_delay_ms=2000.0, gpu_delay_ms=300.0)
    assert gpu[0] == 520.0 and len(gpu) == 10
    fails = verdict(s, max(gpu), budget_ms=5000, av_limit_ms=80)
    assert fails == ["1 of 11 markers lost"]
    fails = verdict(s, 6000.0, budget_ms=2000, av_limit_ms=20)
    assert len(fails) == 4
    assert stats([]) == {"n": 0, "p50": None, "p95": None, "max": None, "min": None}
    assert drift([{"x": 1.0}, {"x": None}, {"x": 3.5}], "x") == 2.5


def test_soak_figures_and_their_verdict():
    def window(t, av, rss):
        return {
            "t_end_s": t,
            "av_offset_median_ms": av,
            "voice_to_received_p50_ms": 3000.0 + t / 100,
            "rss_mb": rss,
            "late_frames": 3,
            "late_speech_frames": 1,
            "skipped_frames": 0,
            "output_drops": 0,
            "frames": 1500,
        }

    windows = [window(60 * (i + 1), -1.0, 700.0 + min(i, 4) * 30 + (i == 9)) for i in range(10)]
    soak = soak_figures(windows, warmup_s=300)
    assert soak["rss_growth_mb"] == 121.0 and soak["rss_growth_after_warmup_mb"] == 1.0
    assert soak["av_offset_drift_ms"] == 0.0 and soak["delay_drift_ms"] == 5.4
    assert soak["late_frames"] == 30 and soak["frames"] == 15000
    summary = {"markers": 1, "found": 1, "voice_to_received_ms": {"p95": 3000.0}}
    summary["av_offset_abs_max_ms"] = 1.0
    assert verdict(summary, None, 5000, 80, soak, rss_bound_mb=16) == []
    windows[-1]["av_offset_median_ms"] = 45.0
    windows[-1]["rss_mb"] = 900.0
    fails = verdict(summary, None, 5000, 80, soak_figures(windows, 300), rss_bound_mb=16)
    assert len(fails) == 2 and "drifted 46 ms" in fails[0] and "grew 80 MB" in fails[1]


def test_gpu_figures_newest_usable_rows(tmp_path):
    def write(folder, name, rows):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    good = {
        "scenario": "compile-fp16-b4",
        "gpu": "NVIDIA H100",
        "quality": {"passed": True},
        "p50_ms": 12.0,
        "p95_ms": 13.0,
        "time": "2026-01-02T00:00:00+00:00",
    }
    write(
        "a",
        "bench.jsonl",
        [
            good,
            {**good, "p95_ms": 50.0, "time": "2026-01-03", "errata": "graphs off"},
            {**good, "p95_ms": 99.0, "time": "2026-01-04", "gpu": "cpu (x86_64)"},
            {**good, "p95_ms": 98.0, "time": "2026-01-05", "quality": {"passed": False}},
        ],
    )
    write("b", "bench.jsonl", [{**good, "p95_ms": 14.0, "time": "2026-01-02T01:00:00+00:00"}])
    write(
        "b",
        "stream_parity.jsonl",
        [{"kind": "encoder_cost", "dtype": "float32", "batch": 1, "ms_per_canvas": 4.6}],
    )
    figs = find_gpu_figures(tmp_path, "compile-fp16-b4")
    assert figs["batch"]["p95_ms"] == 14.0 and figs["batch"]["file"] == "b/bench.jsonl"
    assert figs["canvas"]["ms"] == 4.6
    assert find_gpu_figures(tmp_path, "trt-fp16-b4")["batch"] is None


def test_gpu_figures_take_only_rows_with_the_presets_engine_options(tmp_path):
    """A row with a rewrite or an inductor setting the preset does not use is not its figure;
    rows and presets name the options alike (True is the interleave form, a dict is the
    command line's text)."""
    from musetalk_rt.e2e.analysis import preset_row_options

    base = {"scenario": "compile-fp16-b4", "gpu": "NVIDIA H200", "quality": {"passed": True}}
    base["p50_ms"] = 1.0
    plain = {"freezing": True, "channels_last": True}
    rows = [
        {**base, "p95_ms": 10.0, "time": "1", "engine_options": plain},
        {**base, "p95_ms": 9.0, "time": "2", "engine_options": {**plain, "phase_upsample": True}},
        {**base, "p95_ms": 8.0, "time": "3",
         "engine_options": {**plain, "inductor_config": {"combo_kernels": True}}},
        {**base, "p95_ms": 7.0, "time": "4", "engine_options": {"freezing": False}},
    ]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset = tmp_path / "p.toml"
    preset.write_text('[live]\nengine = "compile"\ncompile_freezing = true\n')
    opts = preset_row_options(preset)
    assert opts["freezing"] is True and opts["phase_upsample"] is None
    assert find_gpu_figures(tmp_path, "compile-fp16-b4", opts)["batch"]["p95_ms"] == 10.0
    assert find_gpu_figures(tmp_path, "compile-fp16-b4")["batch"]["p95_ms"] == 7.0  # any row
    preset.write_text('[live]\ncompile_freezing = true\nphase_upsample = "interleave"\n')
    assert (
        find_gpu_figures(tmp_path, "compile-fp16-b4", preset_row_options(preset))["batch"]["p95_ms"]
        == 9.0
    )
    for text in ("combo_kernels=true", "combo_kernels=1"):  # as the flag takes it
        preset.write_text(f'[live]\ncompile_freezing = true\ninductor_config = "{text}"\n')
        picked = find_gpu_figures(tmp_path, "compile-fp16-b4", preset_row_options(preset))
        assert picked["batch"]["p95_ms"] == 8.0


def test_gpu_figures_preset_values_go_through_the_live_options(tmp_path):
    """A preset's values are checked as the live process checks them (one line naming the
    file); odd values in a row never raise, they match nothing; ``mode = "default"`` is the
    rows' None."""
    from musetalk_rt.e2e.analysis import _options_match, preset_row_options
    from musetalk_rt.errors import UserError

    bad = tmp_path / "bad.toml"
    bad.write_text('[live]\nphase_upsample = "Transpose"\n')
    with pytest.raises(UserError, match="bad.toml.*phase_upsample"):
        preset_row_options(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[live]\ncompile_freezing = true\ncompile_mode = "default"\n')
    opts = preset_row_options(ok)
    assert _options_match({"engine_options": {"freezing": True, "mode": None}}, opts)
    for odd in ({"phase_upsample": "sideways"}, {"inductor_config": "no equals sign"}):
        assert not _options_match({"engine_options": {"freezing": True, **odd}}, opts)


def test_gpu_estimate_filters_by_a_preset_only_for_its_scenario(tmp_path):
    """The event preset filters the event preset's scenario (and names itself in the report);
    another scenario takes its newest row unless a preset is given."""
    import argparse

    from musetalk_rt.e2e.probe import _gpu_estimate

    base = {"gpu": "NVIDIA H200", "quality": {"passed": True}, "p50_ms": 1.0, "time": "1"}
    rows = [
        {**base, "scenario": "compile-fp16-b4", "p95_ms": 9.0,
         "engine_options": {"freezing": True, "phase_upsample": "transpose"}},
        {**base, "scenario": "aoti-fp16-b16", "p95_ms": 30.0,
         "engine_options": {"freezing": True, "channels_last": True}},
    ]  # fmt: skip
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    delay = {"batch_ms": 50.0, "canvas_ms": 5.0, "delay_ms": 3000.0}

    def estimate(scenario, preset=None):
        args = argparse.Namespace(
            gpu_figures=scenario, results_dir=tmp_path, gpu_figures_preset=preset,
            stream_lookahead_ms=None, delay_margin_ms=None,
        )  # fmt: skip
        return _gpu_estimate(args, delay, [])

    event = estimate("compile-fp16-b4")
    assert event["batch"] is None and event["preset"] == "configs/event.toml"
    other = estimate("aoti-fp16-b16")
    assert other["batch"]["p95_ms"] == 30.0 and other["preset"] is None
    preset = tmp_path / "p.toml"
    preset.write_text('[live]\ncompile_freezing = true\nphase_upsample = "transpose"\n')
    given = estimate("compile-fp16-b4", preset)
    assert given["batch"]["p95_ms"] == 9.0 and given["preset"].endswith("p.toml")


def test_gpu_figures_preset_is_read_once_before_the_run(tmp_path):
    """The preset is read when the arguments are checked; an edit during the run changes
    nothing, and a bad one is one line naming the flag, not the live process's --config."""
    import argparse

    from musetalk_rt.e2e.probe import _gpu_preset
    from musetalk_rt.errors import UserError

    preset = tmp_path / "p.toml"
    preset.write_text('[live]\ncompile_freezing = true\nphase_upsample = "transpose"\n')
    args = argparse.Namespace(gpu_figures="compile-fp16-b4", gpu_figures_preset=preset)
    path, opts = _gpu_preset(args)
    assert path == preset and opts["phase_upsample"] == "transpose"
    preset.write_text("not toml [")  # edited mid-run: the run keeps what it checked
    assert _gpu_preset(args) == (path, opts)
    fresh = argparse.Namespace(gpu_figures="compile-fp16-b4", gpu_figures_preset=preset)
    with pytest.raises(UserError, match="--gpu-figures-preset") as err:
        _gpu_preset(fresh)
    assert "--config" not in str(err.value)


def test_a_gpu_figures_scenario_no_row_has_is_refused_before_the_run(tmp_path):
    """A typo (or a batch never benched) is one line naming the recorded ones; with nothing
    recorded at all (an install) the run goes on and says so at the end."""
    import argparse

    from musetalk_rt.e2e.probe import _check_gpu_scenario
    from musetalk_rt.errors import UserError

    def args(scenario):
        return argparse.Namespace(gpu_figures=scenario, results_dir=tmp_path)

    _check_gpu_scenario(args("compile-fp16-b4"))  # nothing recorded: not refused
    (tmp_path / "run").mkdir()
    ok = {"gpu": "NVIDIA H100", "quality": {"passed": True}}
    rows = [{"scenario": "compile-fp16-b4", **ok}]
    rows.append({"scenario": "eager-fp32-b5", **ok, "gpu": "cpu"})  # not a GPU figure
    rows.append({"scenario": "aoti-fp16-b8", **ok, "errata": "timed beside a build"})
    rows.append({"scenario": "compile-fp8-b4", **ok, "quality": {"passed": False}})
    (tmp_path / "run" / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _check_gpu_scenario(args("compile-fp16-b4"))
    _check_gpu_scenario(args("none"))
    _check_gpu_scenario(args(None))  # not given: the event preset's, "not recorded" at the end
    for scenario in ("compile-fp16-b5", "eager-fp32-b5", "aoti-fp16-b8", "compile-fp8-b4"):
        with pytest.raises(UserError) as err:
            _check_gpu_scenario(args(scenario))
        assert str(err.value) == (
            f"--gpu-figures {scenario}: no GPU bench row of that scenario in {tmp_path}; "
            "recorded: compile-fp16-b4 (or --gpu-figures none)"
        )


def test_recorded_figures_exist_for_the_event_preset():
    from musetalk_rt.e2e.analysis import preset_row_options

    opts = preset_row_options(REPO / "configs" / "event.toml")
    figs = find_gpu_figures(REPO / "experiments" / "results", "compile-fp16-b4", opts)
    assert figs["batch"] is not None and figs["canvas"] is not None
    row = json.loads(
        next(
            line
            for line in (REPO / "experiments" / "results" / figs["batch"]["file"]).open()
            if json.loads(line).get("time") == figs["batch"]["time"]
        )
    )
    assert row["engine_options"].get("freezing") is True
    assert not row["engine_options"].get("phase_upsample")
    assert not row["engine_options"].get("inductor_config")


def test_frame_log_lines(tmp_path):
    log = FrameLog(tmp_path / "f.jsonl")
    log.write(ev="frame", frame=3, written=1.23456789)
    log.close()
    log.write(ev="ignored")
    assert json.loads((tmp_path / "f.jsonl").read_text()) == {
        "ev": "frame",
        "frame": 3,
        "written": 1.234568,
    }


# -- nginx from .deb files -------------------------------------------------------------------------


def _fake_deb(path: Path, files: dict[str, bytes]) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size, info.mode = len(body), 0o755
            tar.addfile(info, io.BytesIO(body))
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.xz", b""),
        ("data.tar.xz", data.getvalue()),
    ]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode()
        out += body + (b"\n" if len(body) % 2 else b"")
    path.write_bytes(bytes(out))


def test_unpack_debs_python_fallback_and_launcher(tmp_path, monkeypatch):
    import shutil as _shutil

    debs = tmp_path / "debs"
    debs.mkdir()
    _fake_deb(
        debs / "nginx.deb",
        {"usr/sbin/nginx": b'#!/bin/sh\necho "fake nginx $*"\necho "$LD_LIBRARY_PATH"\n'},
    )
    _fake_deb(
        debs / "rtmp.deb", {"usr/lib/nginx/modules/ngx_rtmp_module.so": b"not really a module"}
    )
    _fake_deb(debs / "lib.deb", {"usr/lib/x86_64-linux-gnu/libfoo.so.1": b""})
    which = _shutil.which
    monkeypatch.setattr(
        "shutil.which", lambda name, *a, **k: None if name == "dpkg-deb" else which(name, *a, **k)
    )
    launcher, module = unpack_debs(debs, tmp_path / "root")
    assert module.read_bytes() == b"not really a module"
    res = subprocess.run([str(launcher), "-v"], capture_output=True, text=True)
    out = res.stdout.splitlines()
    assert out[0] == "fake nginx -v"  # no glibc among the .debs: LD_LIBRARY_PATH instead
    assert out[1].split(":")[0] == str(tmp_path / "root" / "usr/lib/x86_64-linux-gnu")
    with pytest.raises(ValueError, match="libnginx-mod-rtmp"):
        (debs / "rtmp.deb").unlink()
        unpack_debs(debs, tmp_path / "root2")
    with pytest.raises(ValueError, match="refusing"):
        unpack_debs(debs, "/")


def test_rtmp_server_takes_nginx_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(NGINX_ENV, str(tmp_path / "missing-nginx"))
    assert NGINX_ENV in rtmp_available()
    monkeypatch.setenv(NGINX_ENV, sys.executable)
    monkeypatch.setenv(MODULE_ENV, str(tmp_path / "missing.so"))
    assert MODULE_ENV in rtmp_available()


@pytest.mark.skipif(rtmp_available() is not None, reason="needs nginx + libnginx-mod-rtmp")
def test_rtmp_server_start_failure_says_what_nginx_said(tmp_path):
    """nginx's own start-up complaint (on stderr, before its error log opens) reaches the user."""
    from musetalk_rt.testing.rtmp import RtmpServer

    server = RtmpServer(module=str(tmp_path / "no_such_module.so"))
    with pytest.raises(RuntimeError, match=r"exited with status 1: .*no_such_module\.so"):
        server.start()
    server.close()


# -- the command -----------------------------------------------------------------------------------


def test_bench_e2e_bad_input_one_line_each(tmp_path):
    cases = {
        "no marker fits": (["--duration-s", "2"], "holds no marker"),
        "bad rtmp url": (["--rtmp", "http://x/live/k"], "expected rtmp://"),
        "missing speech": (["--speech", str(tmp_path / "none.wav")], "no such file"),
        "unknown avatar": (
            ["--avatar", "ghost", "--avatars-dir", str(tmp_path)],
            "not prepared",
        ),
        "period too short": (["--period-s", "1.5"], "at least 1 s of silence"),
        "missing preset": (
            ["--gpu-figures-preset", str(tmp_path / "none.toml")],
            "--gpu-figures-preset",
        ),
        "bad preset": (["--gpu-figures-preset", str(tmp_path / "bad.toml")], "not valid TOML"),
    }
    (tmp_path / "bad.toml").write_text("[live\n")
    for name, (argv, expect) in cases.items():
        res = subprocess.run(
            # (fp32: fp16, the default, cannot run on a CPU and would be refused first)
            [sys.executable, "-m", "musetalk_rt", "bench", "e2e", "--weights", "tiny"]
            + ["--dtype", "fp32", *argv],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
        )
        err = res.stderr.strip()
        assert res.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and expect in err, (name, err)


@pytest.mark.slow
@pytest.mark.skipif(rtmp_available() is not None, reason=str(rtmp_available()))
def test_bench_e2e_through_nginx_rtmp(tmp_path):
    """The probe's plumbing on the CPU: markers found, rows and the JSON line written."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "musetalk_rt",
            "bench",
            "e2e",
            "--weights",
            "tiny",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--stream-hop",
            "25",
            "--delay-ms",
            "3000",
            "--duration-s",
            "13",
            "--window-s",
            "5",
            "--out",
            str(tmp_path / "rows"),
            "--work",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=600,
    )
    print(res.stdout[-4000:])
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["markers"] == 3 and last["found"] >= 1
    assert last["gpu_voice_to_received_p95_ms"] is not None  # the recorded figures were found
    rows = [json.loads(x) for x in (tmp_path / "rows" / "e2e.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("marker") == 3 and kinds.count("summary") == 1 and "window" in kinds
    summary = rows[-1]
    assert summary["receiver"]["codecs"] == {"video": "h264", "audio": "aac"}
    assert summary["delay"]["delay_ms"] == 3000 and summary["delay"]["derived"] is False
    # the drift threshold follows D's slack over the parts measured at start (two frames with
    # room to spare, else one: a loaded CPU measures slower parts, so the figure is not fixed)
    d = summary["delay"]
    slack_s = delay_slack_s(
        d["delay_ms"] / 1000,
        d["lookahead_ms"] / 1000,
        d["canvas_ms"] / 1000,
        d["batch_ms"] / 1000,
        d["channels"],
        d["per_channel_ms"] / 1000,
    )
    assert d["drift_shift_ms"] == round(shift_at_for_slack(slack_s) * 1000, 3)
    assert d["drift_shift_ms"] in (40.0, 80.0)
    ok = [r for r in rows if r["kind"] == "marker" and r["status"] == "ok"]
    for r in ok:
        total = r["voice_to_server_ms"] + r["server_to_encoded_ms"] + r["encoded_to_received_ms"]
        assert abs(total - r["voice_to_received_ms"]) < 0.5
    frames = (tmp_path / "work" / "frames.jsonl").read_text().splitlines()
    assert {json.loads(f)["ev"] for f in frames} >= {"delay", "start", "session", "frame"}
    for marker in ("voice→server", "server→encoded", "encoded→received", "A/V offset"):
        assert marker in res.stdout


def test_a_run_without_markers_reports_that_not_python_nones(tmp_path, capsys):
    """No marker found (a short run, a silent stream): the lines say so, the verdict fails."""
    from musetalk_rt.cli import build_parser
    from musetalk_rt.e2e.probe import _report

    args = build_parser().parse_args(["bench", "e2e", "--results-dir", str(tmp_path)])
    delay = {"delay_ms": 3000, "batch_ms": 60.0, "canvas_ms": 100.0, "lookahead_ms": 80}
    run = {
        "env": {"gpu": "cpu"},
        "delay": delay | {"batch": 4},
        "windows": [],
        "markers": [{"status": "missing", "marker": 0, "frame": 25}],
        "source": "espeak-ng",
        "startup_s": 1.0,
        "live_summary": {},
        "receiver": {},
        "rows_path": tmp_path / "e2e.jsonl",
        "work": tmp_path,
    }
    rows = []
    assert _report(args, run, rows.append) == 0  # (non-zero only under --guard)
    out = capsys.readouterr().out
    assert "None" not in out.replace('": null', "")
    assert "no voice-to-received estimate (no marker was found)" in out
    assert "voice-to-received p95 n/a (no marker found)" in out and "FAIL" in out
    assert rows and rows[0]["passed"] is False


@pytest.mark.parametrize(
    "extra, code",
    [(["--dtype", "fp16"], 3), (["--engine", "nope", "--dtype", "fp32"], 2)],
)
def test_an_engine_that_cannot_run_here_is_refused_before_the_run(capsys, extra, code):
    """fp16 on a CPU (the default dtype) or an unknown engine: one line, before nginx and the
    live process start."""
    from musetalk_rt.cli import main

    argv = ["bench", "e2e", "--weights", "tiny", "--device", "cpu", "--duration-s", "5"]
    assert main(argv + extra) == code  # (3: this host lacks what it needs; 2: a bad name)
    out = capsys.readouterr()
    (line,) = out.err.strip().splitlines()
    assert line.startswith("musetalk-rt: error: ") and ("cannot run here" in line or "nope" in line)
    assert "markers:" not in out.out  # the run had not begun


def test_the_engine_check_takes_the_fallback_the_live_process_would_take():
    """trt cannot run here, but with --fallback eager the live process would run eager: the
    probe's early check passes it (and still refuses without the fallback)."""
    from musetalk_rt.cli import build_parser
    from musetalk_rt.e2e.probe import _check_args
    from musetalk_rt.errors import UserError

    argv = "bench e2e --weights tiny --device cpu --dtype fp32 --engine trt --duration-s 5"
    _check_args(build_parser().parse_args([*argv.split(), "--fallback", "eager"]))
    with pytest.raises(UserError, match="'trt' cannot run here"):
        _check_args(build_parser().parse_args(argv.split()))
