"""The event preset: `--config FILE` `[live]` values as defaults, and the rows it cites."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from musetalk_rt.errors import UserError
from musetalk_rt.live.app import build_parser
from musetalk_rt.live.app import main as live_main
from musetalk_rt.live.preset import parse_with_preset, preset_defaults

REPO = Path(__file__).resolve().parents[1]
EVENT = REPO / "configs" / "event.toml"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _preset_and_cited_rows(path: Path) -> tuple[dict, dict]:
    """A preset's ``[live]`` values and, per key, the rows its sources select (all must exist)."""
    import tomllib

    live = tomllib.loads(path.read_text())["live"]
    sources = live.pop("sources")
    assert set(sources) == set(live), "every value cites its rows"
    cited_rows: dict = {}
    for key, cited in sources.items():
        for src in cited:
            file, _, sel = src.partition("#")
            field, _, want = sel.partition("=")
            rows = _rows(REPO / file)
            hits = [r for r in rows if str(r.get(field)) == want]
            assert hits, f"{key}: no row with {field}={want} in {file}"
            cited_rows.setdefault(key, []).extend(hits)
    return live, cited_rows


def test_event_preset_cites_rows_that_exist_and_agree():
    import tomllib

    live, _ = _preset_and_cited_rows(EVENT)
    sources = tomllib.loads(EVENT.read_text())["live"]["sources"]
    # the live run it cites ran these very settings
    run = sources["engine"][0].split("#run=")[1]
    e2e = _rows(REPO / sources["engine"][0].split("#")[0])
    summary = next(r for r in e2e if r.get("kind") == "summary" and r["run"] == run)
    assert (summary["engine"], summary["dtype"]) == (live["engine"], live["dtype"])
    assert summary["batch_sizes"] == live["batch_sizes"]
    assert summary["live_summary"]["live"][0]["late_frames"] == 0
    assert summary["delay"]["lookahead_ms"] == live["stream_lookahead_ms"] + 80
    bench = _rows(REPO / sources["compile_freezing"][1].split("#")[0])
    assert any(
        r["scenario"] == "compile-fp16-b4" and (r.get("engine_options") or {}).get("freezing")
        for r in bench
    )


def test_channels_preset_cites_the_many_channel_runs_that_used_it():
    """``configs/channels.toml``: every value cites live-probe rows, and the runs it cites (16
    channels for 5 minutes and 20 for 2 at one commit, 20 for 5 at a later one) used exactly
    these settings and had no late frame."""
    live, cited = _preset_and_cited_rows(REPO / "configs" / "channels.toml")
    shas = ("90c8", "b503")
    runs = [r for rows in cited.values() for r in rows if r.get("git_sha", "")[:4] in shas]
    assert {(r["channels"], r["speech_s"]) for r in runs} == {(16, 300.0), (20, 120.0), (20, 300.0)}
    for r in runs:
        assert r["late_frames"] == 0 and r["speech_frames"] > 0 and r["late_windows"] == 0
        assert (r["engine"], r["dtype"]) == (live["engine"], live["dtype"])
        assert r["batch_sizes"] == ",".join(map(str, live["batch_sizes"]))
        extra = r["extra_args"]
        assert "--compile-freezing" in extra and "--channels-last-norm" in extra
        for flag, key in (
            ("--phase-upsample", "phase_upsample"),
            ("--stream-hop", "stream_hop"),
            ("--delay-ms", "delay_ms"),
        ):
            assert extra[extra.index(flag) + 1] == str(live[key]), flag
    # the runs did not name a capture: they had the live process's compile default, manual
    from musetalk_rt.live.app import live_engine_options

    for r in runs:
        assert "--compile-graph-capture" not in r["extra_args"]
    plain = build_parser().parse_args(["--avatar", "a", "--engine", "compile"])
    assert live_engine_options(plain)["graph_capture"] == live["compile_graph_capture"]
    args = parse_with_preset(
        build_parser(),
        ["--config", str(REPO / "configs" / "channels.toml"), "--avatar", "a", "--record", "r"],
    )
    assert (args.batch_sizes, args.stream_hop, args.delay_ms) == ([16, 32], 5, 1000)
    assert (args.phase_upsample, args.channels_last_norm) == ("transpose", True)


def test_preset_values_are_defaults_and_the_command_line_wins():
    p = build_parser()
    d = preset_defaults(EVENT, p)
    assert d["engine"] == "compile" and d["batch_sizes"] == [4] and d["compile_freezing"] is True
    p = build_parser()
    args = parse_with_preset(p, ["--config", str(EVENT), "--avatar", "a", "--record", "r.mp4"])
    assert (args.engine, args.dtype, args.batch_sizes) == ("compile", "fp16", [4])
    assert args.compile_freezing and args.compile_graph_capture == "manual"
    assert (args.stream_lookahead_ms, args.delay_margin_ms) == (80, 100)
    args = parse_with_preset(
        build_parser(),
        ["--config", str(EVENT), "--avatar", "a", "--engine", "eager", "--batch-sizes", "8"],
    )
    assert (args.engine, args.batch_sizes) == ("eager", [8])


def test_a_preset_started_with_another_engine_leaves_out_what_that_engine_does_not_take(capsys):
    """``--config configs/channels.toml --engine aoti`` (the restart-fast engine): the preset's
    compile-only capture option is left out with one line, the options aoti shares (freezing,
    the rewrites) stay; the same option given on the command line stays and gets the engine's
    error, which names only what that engine does not take."""
    from musetalk_rt.engines import get_engine
    from musetalk_rt.live.app import live_engine_options

    channels = str(REPO / "configs" / "channels.toml")
    base = ["--config", channels, "--avatar", "a", "--record", "r"]
    args = parse_with_preset(build_parser(), [*base, "--engine", "aoti", "--aoti-channels-last"])
    assert "compile_graph_capture" in args.from_preset and "engine" not in args.from_preset
    opts = live_engine_options(args)
    assert opts == {
        "freezing": True,
        "phase_upsample": "transpose",
        "channels_last_norm": True,
        "channels_last": True,
    }
    get_engine("aoti", **opts)  # takes every one of them
    # the build command a missing engine's refusal prints: the same options, nothing aoti refuses
    from musetalk_rt.cli import build_parser as cli_parser
    from musetalk_rt.cli import engines_build_command

    words = shlex.split(engines_build_command(args, [32, 16]))  # as a shell reads it
    assert words[:5] == ["musetalk-rt", "engines", "build", "--engine", "aoti"]
    assert "--compile-graph-capture" not in words
    built = cli_parser().parse_args(words[1:])
    assert built.batch_sizes == [16, 32] and built.compile_graph_capture is None
    assert live_engine_options(built) == opts
    out = capsys.readouterr().out
    assert f"note: --config {channels}: --compile-graph-capture not used" in out
    assert "(the aoti engine does not take it)" in out
    # with the preset's own engine nothing is left out and nothing is said
    args = parse_with_preset(build_parser(), base)
    assert live_engine_options(args)["graph_capture"] == "manual"
    assert capsys.readouterr().out == ""
    # eager takes none of the preset's engine options: all left out, one line
    args = parse_with_preset(build_parser(), [*base, "--engine", "eager"])
    assert live_engine_options(args) == {}
    assert "--compile-freezing, --compile-graph-capture" in capsys.readouterr().out
    # given on the command line, the option is the user's: it stays, and the engine refuses it
    given = [*base, "--engine", "aoti", "--compile-graph-capture", "manual"]
    opts = live_engine_options(parse_with_preset(build_parser(), given))
    assert opts["graph_capture"] == "manual"
    with pytest.raises(UserError, match=r"'aoti' does not take the options graph_capture \("):
        get_engine("aoti", **opts)
    # no preset: nothing comes from a file
    assert parse_with_preset(build_parser(), ["--avatar", "a"]).from_preset == set()


def test_every_engine_option_maps_to_the_options_that_set_it(tmp_path, capsys):
    """``ENGINE_OPTION_DESTS`` covers every key the command line can produce, and a key set by
    either of two flags (``--no-channels-last`` / ``--aoti-channels-last``) is left out for an
    engine that does not take it only when it came from the file; the build command a refusal
    prints for that engine leaves it out too; an unknown engine gets no note, only its error."""
    from musetalk_rt.cli import ENGINE_OPTION_DESTS, _engine_options, compile_argv
    from musetalk_rt.live.app import live_engine_options

    every = ["--avatar", "a", "--compile-backend", "inductor", "--compile-mode", "max-autotune"]
    every += ["--no-cuda-graphs", "--no-channels-last", "--compile-freezing", "--compile-cd-tuning"]
    every += ["--compile-fuse-qkv", "--compile-cudnn-benchmark", "--compile-graph-capture"]
    every += ["manual", "--aoti-weights", "so", "--aoti-max-autotune", "--autotune-stages", "unet"]
    every += ["--phase-upsample", "transpose", "--channels-last-norm"]
    every += ["--inductor-config", "combo_kernels=1"]
    opts = _engine_options(build_parser().parse_args(every))
    assert set(opts) == set(ENGINE_OPTION_DESTS)  # every key, and no key nothing can set
    aoti_flags = build_parser().parse_args(["--avatar", "a", "--aoti-channels-last"])
    assert set(_engine_options(aoti_flags)) <= set(ENGINE_OPTION_DESTS)

    f = tmp_path / "p.toml"
    f.write_text("[live]\nengine = 'aoti'\naoti_channels_last = true\nno_cuda_graphs = true\n")
    args = parse_with_preset(
        build_parser(), ["--config", str(f), "--avatar", "a", "--engine", "trt"]
    )
    assert live_engine_options(args) == {"cuda_graphs": False}  # trt takes the graphs switch
    assert "--aoti-channels-last not used (the trt engine does not take it)" in (
        capsys.readouterr().out
    )
    assert compile_argv(args, engine="trt") == ["--no-cuda-graphs"]
    assert compile_argv(args) == ["--no-cuda-graphs", "--aoti-channels-last"]
    assert compile_argv(args, engine="aoti") == compile_argv(args)
    args = parse_with_preset(
        build_parser(), ["--config", str(f), "--avatar", "a", "--engine", "eager"]
    )
    assert live_engine_options(args) == {}
    assert "--no-cuda-graphs, --aoti-channels-last not used" in capsys.readouterr().out
    # one flag from the file, its twin on the command line: the user's choice stays
    argv = ["--config", str(f), "--avatar", "a", "--engine", "eager", "--no-channels-last"]
    assert live_engine_options(parse_with_preset(build_parser(), argv)) == {"channels_last": False}
    assert capsys.readouterr().out.count("not used") == 1  # only the file's graphs switch
    args = parse_with_preset(build_parser(), ["--config", str(f), "--avatar", "a", "--engine", "x"])
    assert "cuda_graphs" in live_engine_options(args)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[live]\nengine = ", "not valid TOML"),
        ("[live]\nwarp_speed = 9\n", "unknown [live] key 'warp_speed'"),
        ("[live]\ntoken = 's3cret'\n", "token cannot be set in a file"),
        ("[live]\ncompile_freezing = 'yes'\n", "must be true or false"),
        ("[live]\nengine = {a = 1}\n", "expected a value or a list"),
        ("live = 3\n", "[live] must be a table"),
        ("[live]\ndelay_margin_ms = 1.5\n", "delay_margin_ms = 1.5"),
        ("[live]\ndtype = 'fp8'\n", "choose one of"),
        ("[live]\nchannel = ['a=b']\n", "repeatable"),
    ],
)
def test_bad_presets_one_line(tmp_path, text, expect):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(UserError, match=None) as err:
        preset_defaults(f, build_parser())
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_live_with_a_bad_preset_exits_2_in_one_line(tmp_path, capsys):
    assert live_main(["--config", str(tmp_path / "missing.toml"), "--avatar", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file" in err
    (tmp_path / "bad.toml").write_text("[live]\nsecret = 1\n")
    assert live_main(["--config", str(tmp_path / "bad.toml"), "--avatar", "a"]) == 2
    assert "unknown [live] key" in capsys.readouterr().err
