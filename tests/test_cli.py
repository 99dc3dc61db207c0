"""The command line end to end: render, bench, and one clear line for every bad input."""

import json
import subprocess
import sys
import wave

import av
import cv2
import numpy as np
import pytest
import torch

from musetalk_rt.cli import main
from musetalk_rt.media import probe_media


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "musetalk_rt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _render_argv(avatars, audio, out, *extra):
    """``render`` with tiny weights and the avatar prepared by the ``yongen_avatar`` fixture."""
    return [
        "render",
        "--weights",
        "tiny",
        "--avatars-dir",
        str(avatars),
        "--avatar",
        "yongen",
        "--audio",
        str(audio),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
def test_render_eng_wav_1500_frames_60s_aac(yongen_avatar, fixture_file, tmp_path):
    out = tmp_path / "eng.mp4"
    res = _run(*_render_argv(yongen_avatar, fixture_file("eng.wav"), out, "--batch-size", "16"))
    assert res.returncode == 0, res.stderr
    info = probe_media(out)
    assert info["video_frames"] == 1500 and info["fps"] == 25
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert abs(info["audio_duration_s"] - 60.0) < 0.05
    assert (info["width"], info["height"]) == (704, 1216)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 1500 and summary["weights"] == "tiny"
    assert {"unet", "vae_decode", "to_host", "blend", "encode"} <= set(summary["stage_ms"])
    assert "noise" in res.stdout  # the output says plainly that tiny weights make noise


def test_render_encodes_in_a_thread_on_request_with_the_same_result(
    tiny_models, yongen_avatar, fixture_file, tmp_path, monkeypatch
):
    """A GPU render encodes in a thread of its own (the default where the models run on a GPU);
    forced on here, its encoder gets the same frames in the same order as the inline one's, and
    its file decodes to the same pictures, with sound of the same length.

    The files are compared within x264's tolerance, not bit for bit: on a 2-core host the first
    render of a process now and then encoded identical frames into other bytes than the renders
    after it (inline or threaded alike; experiments/LOG.md 2026-12-04, 17:30).
    """
    import hashlib

    from musetalk_rt import media
    from musetalk_rt.avatar import load_avatar
    from musetalk_rt.engines.parity import psnr_u8
    from musetalk_rt.media import load_audio, read_video
    from musetalk_rt.pipeline import render

    handed: dict[bool, list[str]] = {}  # encode mode -> digest of every frame the encoder got
    encode = media.Mp4Writer.write

    def write(self, frame):
        handed[mode].append(hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest())
        return encode(self, frame)

    monkeypatch.setattr(media.Mp4Writer, "write", write)
    clip = load_audio(fixture_file("eng.wav")).to_mono_16k()[16000:32000]  # 1 s: 25 frames
    wav = tmp_path / "one_s.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(clip, -1, 1) * 32767).astype("<i2").tobytes())
    avatar = load_avatar("yongen", yongen_avatar)
    reports, frames = {}, {}
    for mode in (False, True):
        handed[mode] = []
        out = tmp_path / f"thread_{mode}.mp4"
        reports[mode] = render(
            tiny_models, avatar, wav, out, batch_size=8, log=lambda _: None, encode_thread=mode
        )
        frames[mode] = read_video(out)[0]
        assert probe_media(out)["audio_duration_s"] == pytest.approx(1.0, abs=0.05)
    assert reports[True].frames == reports[False].frames == len(frames[True]) == 25
    assert handed[True] == handed[False] and len(handed[True]) == 25  # same frames, same order
    for a, b in zip(frames[False], frames[True], strict=True):
        assert psnr_u8(torch.from_numpy(a), torch.from_numpy(b)) > 45.0  # 61-70 dB seen
    for report in reports.values():  # the table says how much of the encoding was waited for
        assert report.stage_ms["encode"] > 0 and report.stage_ms["encode_wait"] > 0


def test_render_stereo_48k_in_process(yongen_avatar, fixture_file, tmp_path, capsys):
    out = tmp_path / "y.mp4"
    code = main(
        _render_argv(
            yongen_avatar,
            fixture_file("yongen.wav"),
            out,
            "--engine",
            "compile",
            "--compile-backend",
            "aot_eager",
            "--batch-size",
            "8",
            "--x264-preset",
            "ultrafast",
        )
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # a build that may take minutes says which stage it is at, before it starts
    lines = printed.out.splitlines()
    unet = lines.index("engine: preparing unet (compile/fp32, buckets 8) …")
    assert lines.index("engine: preparing vae_decode (compile/fp32, buckets 8) …") > unet
    info = probe_media(out)
    assert info["video_frames"] == 200 and info["audio_channels"] == 2
    assert info["audio_sample_rate"] == 48000 and abs(info["audio_duration_s"] - 8.0) < 0.05
    with av.open(str(out)) as container:  # x264's settings, written into its first packet
        assert b" subme=0 " in bytes(next(container.demux(video=0)))  # ultrafast's


def test_render_checks_the_x264_preset_before_any_work(tiny_models, yongen_avatar, tmp_path):
    """A bad preset from Python is refused before the audio is read or an engine is built."""
    from musetalk_rt.avatar import load_avatar
    from musetalk_rt.errors import UserError
    from musetalk_rt.pipeline import render

    avatar = load_avatar("yongen", yongen_avatar)
    with pytest.raises(UserError, match="unknown x264 preset 'turbo'; choose one of ultrafast"):
        render(tiny_models, avatar, tmp_path / "none.wav", tmp_path / "o.mp4", x264_preset="turbo")
    assert list(tmp_path.iterdir()) == []


def test_render_refuses_an_unknown_x264_preset_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(
            ["render", "--avatar", "a", "--audio", "a.wav", "--out", "o.mp4", "--x264-preset", "x"]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--x264-preset: invalid choice: 'x' (choose from" in err and "ultrafast" in err


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_bench_refuses_a_peers_deadline_that_is_not_a_finite_number_0_or_more(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--engine", "eager", "--gpu-peers-deadline-s", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--gpu-peers-deadline-s:" in err and "Traceback" not in err


def test_bench_hands_each_engine_the_options_it_takes(monkeypatch, capsys, tmp_path):
    """``bench --engine eager,compile,aoti`` splits the options among the engines (aoti's were
    once dropped: only compile got any); an option none of them takes is one line, exit 2."""
    from musetalk_rt import bench
    from musetalk_rt.cli import per_engine_options

    got = per_engine_options(
        ["eager", "compile", "aoti"],
        {"freezing": True, "graph_capture": "manual", "weights": "so", "cuda_graphs": True},
    )
    assert got == {
        "eager": {},
        "compile": {"freezing": True, "graph_capture": "manual", "cuda_graphs": True},
        "aoti": {"freezing": True, "weights": "so", "cuda_graphs": True},
    }
    seen = {}

    def fake_run_bench(models, engines, dtypes, batch_sizes, engine_options, **kw):
        seen.update(engine_options)
        return []

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    argv = "bench --weights tiny --device cpu --engine aoti --dtype fp32 --aoti-weights so"
    main([*argv.split(), "--phase-upsample", "--compile-freezing", "--out", str(tmp_path)])
    assert seen["aoti"] == {"weights": "so", "phase_upsample": True, "freezing": True}
    capsys.readouterr()
    assert main("bench --weights tiny --engine eager --compile-freezing".split()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "freezing" in err[0] and "eager" in err[0]


def test_bench_writes_rows_and_ends_with_json(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--weights",
            "tiny",
            "--device",
            "cpu",
            "--engine",
            "eager",
            "--dtype",
            "fp32,bf16",
            "--batch-sizes",
            "2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    last = json.loads(out.strip().splitlines()[-1])
    assert last["rows"] == 2 and last["all_pass_quality"]
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    for r in rows:
        for key in (
            "scenario",
            "engine",
            "dtype",
            "batch",
            "p50_ms",
            "p95_ms",
            "fps",
            "build_s",
            "quality",
            "gpu",
            "torch",
            "diffusers",
            "git_sha",
            "weights",
            "time",
        ):
            assert key in r
        assert r["weights"] == "tiny" and r["quality"]["passed"]


def _wav(path, n):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(n, "<i2").tobytes())
    return path


def _bad_cases(tmp_path, avatars, fixtures):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    empty = _wav(tmp_path / "empty.wav", 0)
    short = _wav(tmp_path / "short.wav", 100)
    zero_png = tmp_path / "zero.png"
    zero_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 128, np.uint8))

    def render(audio, *extra):
        return _render_argv(avatars, audio, tmp_path / "o.mp4", *extra)

    prep = ["avatar", "prepare", "--weights", "tiny", "--avatars-dir", str(tmp_path / "av")]
    no_models = ["avatar", "prepare", "--models-dir", str(tmp_path / "no_models")]
    damaged = tmp_path / "damaged"
    (damaged / "broken").mkdir(parents=True)
    (damaged / "broken" / "manifest.json").write_text("[]")  # JSON, but not a manifest
    (damaged / "broken" / "geometry.json").write_text("{}")
    return {
        "missing audio": (render(str(tmp_path / "nope.wav")), "does not exist"),
        "not audio": (render(str(text)), "not an audio file"),
        "empty wav": (render(str(empty)), "no audio samples"),
        "too short": (render(str(short)), "shorter than one video frame"),
        "unknown engine": (
            render(str(fixtures / "yongen.wav"), "--engine", "warp"),
            "unknown engine 'warp'",
        ),
        "unknown avatar": (
            [
                "render",
                "--weights",
                "tiny",
                "--avatars-dir",
                str(avatars),
                "--avatar",
                "ghost",
                "--audio",
                str(fixtures / "yongen.wav"),
                "--out",
                str(tmp_path / "o.mp4"),
            ],
            "not prepared",
        ),
        "image without pixels": (prep + ["--source", str(zero_png), "--id", "z"], "zero.png"),
        "box outside frame": (
            prep + ["--source", str(img), "--id", "b", "--bbox", "10,10,200,200"],
            "outside the 64x64 frame",
        ),
        "missing source": (
            prep + ["--source", str(tmp_path / "none.mp4"), "--id", "m"],
            "does not exist",
        ),
        "missing weights": (
            [
                "render",
                "--avatars-dir",
                str(avatars),
                "--avatar",
                "yongen",
                "--models-dir",
                str(tmp_path / "empty_models"),
                "--audio",
                str(fixtures / "yongen.wav"),
                "--out",
                str(tmp_path / "o.mp4"),
            ],
            "weights download",
        ),
        "cuda without gpu": (
            render(str(fixtures / "yongen.wav"), "--device", "cuda:7"),
            "cuda",
        ),
        "infinite box": (
            prep + ["--source", str(img), "--id", "i", "--bbox", "0,0,inf,10"],
            "four integers",
        ),
        # the id and the source are checked before the models load (here: there are none)
        "bad id, no weights": (
            [*no_models, "--source", str(img), "--id", "../x"],
            "letters, digits",
        ),
        "missing source, no weights": (
            [*no_models, "--source", str(tmp_path / "none.mp4"), "--id", "m"],
            "does not exist",
        ),
        "damaged avatar": (
            ["avatar", "info", "broken", "--avatars-dir", str(damaged)],
            "damaged",
        ),
        "avatar id outside the folder": (
            ["avatar", "info", "..", "--avatars-dir", str(damaged)],
            "letters, digits",
        ),
        "contact sheet not an image": (
            ["avatar", "check", "yongen", "--avatars-dir", str(avatars), "--sheet", "s.txt"],
            "give a .png",
        ),
    }


def test_bad_inputs_one_line_nonzero_no_traceback(yongen_avatar, fixtures, tmp_path, capsys):
    for name, (argv, expect) in _bad_cases(tmp_path, yongen_avatar, fixtures).items():
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code != 0, name
        assert len(err.splitlines()) == 1, (name, err)
        assert expect in err, (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.mp4").exists()  # nothing half-written


def test_bad_input_through_a_real_process(tmp_path):
    res = _run(
        "render",
        "--weights",
        "tiny",
        "--avatar",
        "x",
        "--audio",
        str(tmp_path / "missing.wav"),
        "--out",
        str(tmp_path / "o.mp4"),
    )
    assert res.returncode == 2
    assert (
        res.stderr.strip() == f"musetalk-rt: error: audio file {tmp_path / 'missing.wav'} "
        "does not exist"
    )


def test_help_documents_every_command(capsys):
    res = _run("--help")  # the installed entry point, once
    assert res.returncode == 0 and "usage: musetalk-rt" in res.stdout
    for cmd in (  # each command's help in this process (a fresh interpreter each took ~4 s)
        ["weights", "--help"],
        ["avatar", "prepare", "--help"],
        ["avatar", "check", "--help"],
        ["render", "--help"],
        ["audio", "check", "--help"],
        ["bench", "--help"],
        ["bench", "e2e", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(cmd)
        assert exit_.value.code == 0 and "usage: musetalk-rt" in capsys.readouterr().out, cmd


def test_compile_options_forwarded_to_a_child_process_whole():
    """`compile_argv` gives back every compile option, so `bench e2e` passes all to `live`."""
    import argparse

    from musetalk_rt.cli import _add_compile_options, _engine_options, compile_argv

    p = argparse.ArgumentParser()
    _add_compile_options(p)
    given = [
        "--compile-backend", "inductor", "--compile-mode", "max-autotune",
        "--compile-graph-capture", "manual", "--no-cuda-graphs", "--no-channels-last",
        "--compile-freezing", "--compile-cd-tuning", "--compile-fuse-qkv",
        "--compile-cudnn-benchmark", "--phase-upsample", "transpose", "--channels-last-norm",
    ]  # fmt: skip
    args = p.parse_args(given)
    argv = compile_argv(args)
    assert sorted(argv) == sorted(given)
    assert _engine_options(p.parse_args(argv)) == _engine_options(args)
    assert compile_argv(p.parse_args([])) == []


def test_gpu_out_of_memory_is_one_line_that_says_what_to_change(monkeypatch, capsys):
    """torch's CUDA out-of-memory error (a bench of five processes at once died of one) is a
    user error with the fix, not an "internal error … report it"."""
    import musetalk_rt.cli as cli
    from musetalk_rt.errors import gpu_out_of_memory

    text = (
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.18 GiB "
        "of which 51.75 GiB is free. Including non-PyTorch memory, this process has 13.81 GiB "
        "memory in use. 14.25 GiB allowed; Of the allocated memory 11.2 GiB is allocated by PyTorch"
    )

    def bench_out_of_memory(args):
        raise torch.cuda.OutOfMemoryError(text)

    monkeypatch.setattr(cli, "cmd_bench", bench_out_of_memory)
    assert main(["bench", "--weights", "tiny"]) == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("musetalk-rt: error: the GPU ran out of memory (CUDA out of memory.")
    assert "51.75 GiB is free; this process may use only 14.25 GiB" in line
    assert "--gpu-peers" in line and "--batch-sizes" in line and "internal error" not in line
    # the card itself full: the general fix; found inside torch.compile's wrapper too
    full = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.18 GiB "
        "of which 1.20 GiB is free. Including non-PyTorch memory, this process has 70 GiB"
    )
    wrapped = RuntimeError("backend='inductor' raised: OutOfMemoryError")
    wrapped.inner_exception = full
    err = gpu_out_of_memory(wrapped)
    assert err is not None and err.exit_code == 3
    assert "1.20 GiB is free)" in str(err) and "nvidia-smi" in str(err)
    chained = RuntimeError("while building")
    chained.__cause__ = full
    assert gpu_out_of_memory(chained) is not None
    # the live process says the same at start (an engine build that does not fit the card)
    import musetalk_rt.live.app as live_app

    monkeypatch.setattr(live_app, "run", bench_out_of_memory)
    assert live_app.main(["--avatar", "a", "--record", "r.mp4"]) == 3
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m musetalk_rt.live: error: the GPU ran out of memory")
    # other errors are not mistaken for it
    assert gpu_out_of_memory(RuntimeError("CUDA error: an illegal memory access")) is None
    assert gpu_out_of_memory(MemoryError()) is None


def test_render_takes_the_engine_options_that_are_part_of_an_engines_cache_key():
    """An aoti engine built with options is found only by a render given the same ones; the
    build command a render prints for a missing engine carries them too."""
    from musetalk_rt.cli import _engine_options, build_parser, engines_build_words

    opts = "--compile-freezing --aoti-channels-last --phase-upsample transpose --channels-last-norm"
    argv = "render --avatar a --audio a.wav --out o.mp4 --engine aoti --dtype fp16 " + opts
    args = build_parser().parse_args(argv.split())
    assert _engine_options(args) == {
        "freezing": True,
        "channels_last": True,
        "phase_upsample": "transpose",
        "channels_last_norm": True,
    }
    words = engines_build_words(args, [args.batch_size])
    assert set(opts.split()) <= set(words[words.index("--batch-sizes") :])


@pytest.mark.parametrize("sub", ["", "rows"])
def test_bench_refuses_an_out_that_is_a_file_before_any_work(tmp_path, capsys, sub):
    """Rows go into a folder; a file there is refused at once, not after the benchmark."""
    taken = tmp_path / "notes.md"
    taken.write_text("kept\n")
    out = taken / sub if sub else taken
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--weights", "tiny", "--device", "cpu", "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{taken} is a file; give a folder for the rows" in err and "Traceback" not in err
    assert taken.read_text() == "kept\n"


@pytest.mark.parametrize(
    "argv, where",
    [
        ("render --avatar a --audio a.wav --out o.mp4 --batch-size 0", "musetalk-rt render"),
        ("bench --batch-sizes 1,x", "musetalk-rt bench"),
        ("engines build --jobs 0", "musetalk-rt engines build"),
        ("renderr", "musetalk-rt"),
    ],
)
def test_an_argument_the_parser_refuses_is_one_line(argv, where, capsys):
    """The error and where the usage is, not argparse's whole usage block first."""
    with pytest.raises(SystemExit) as exit_:
        main(argv.split())
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{where}: error: ") and line.endswith(f"(see {where} --help)")


def test_the_live_process_refuses_a_bad_argument_in_one_line_under_its_own_name(capsys):
    from musetalk_rt.live.app import main as live_main

    for argv, what in (
        (["--avatar", "a", "--delay-ms", "abc"], "--delay-ms"),
        (["--config"], "--config"),
    ):
        with pytest.raises(SystemExit) as exit_:
            live_main(argv)
        assert exit_.value.code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"python -m musetalk_rt.live: error: argument {what}")


@pytest.mark.parametrize("out", ["folder", "x.txt", "file.md/x.mp4"])
def test_render_refuses_an_output_it_cannot_write_before_any_work(tmp_path, capsys, out):
    """A folder, a name that is not an MP4's or a path under a file: one line, before the
    models load (a folder failed after the whole render, as an internal error)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.md").write_text("kept\n")
    audio = tmp_path / "a.wav"
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    argv = ["render", "--avatar", "none", "--audio", str(audio), "--out", str(tmp_path / out)]
    assert main(argv + ["--weights", "tiny"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("musetalk-rt: error: --out ") and "avatar" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "file.md", "folder"]
