"""The engine cache: keys, stale/foreign folders, and compile artifacts across processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_rt.cli import main
from musetalk_rt.engines import cache
from musetalk_rt.engines.cache import EngineKey


def _key(**over):
    base = dict(
        stage="vae_decode",
        engine="compile",
        dtype="fp32",
        buckets=(2,),
        weights_fingerprint="tiny-s0-abc",
        input_shapes={"in:pred_latents": [2, 4, 32, 32]},
        options={"backend": "inductor"},
        device={"device": "cpu", "gpu": None, "capability": "x86_64"},
    )
    base.update(over)
    return EngineKey(**base)


def test_key_covers_everything_an_engine_depends_on(tmp_path):
    k = _key()
    variants = [
        _key(weights_fingerprint="real-123"),
        _key(buckets=(4,)),
        _key(dtype="fp16"),
        _key(options={"backend": "inductor", "freezing": True}),
        _key(device={"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}),
        _key(torch_version="2.11.0+cu130"),
        _key(input_shapes={"in:pred_latents": [2, 4, 64, 64]}),
        _key(diffusers_version="0.1.0"),
        _key(model_code="0" * 16),  # an edit of modeling/: a package traced from the old code
    ]
    assert len({k.digest, *(v.digest for v in variants)}) == len(variants) + 1
    folder = cache.store(tmp_path, k, {"engine.bin": b"\x01\x02"}, {"build_s": 1.0})
    assert folder == k.folder(tmp_path) and (folder / "engine.bin").read_bytes() == b"\x01\x02"
    assert cache.find(tmp_path, k) == folder
    assert all(cache.find(tmp_path, v) is None for v in variants)  # never a foreign engine
    # a folder whose meta.json does not match its key (tampered or stale) is ignored
    meta = json.loads((folder / "meta.json").read_text())
    meta["key"]["torch_version"] = "1.0"
    (folder / "meta.json").write_text(json.dumps(meta))
    assert cache.find(tmp_path, k) is None
    (folder / "meta.json").write_text("{not json")
    assert cache.find(tmp_path, k) is None
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_killed_build_leaves_nothing_after_the_next_store(tmp_path):
    """A build killed while writing leaves ``.NAME.partial-PID`` (an engine can be GBs); the
    next store of that engine removes it, and keeps a folder of a process that still runs."""
    k = _key()
    parent = k.folder(tmp_path).parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = parent / f".{k.folder(tmp_path).name}.partial-{dead}"
    stale.mkdir(parents=True)
    (stale / "unet.pt2").write_bytes(b"half")
    running = parent / f".{k.folder(tmp_path).name}.partial-1"  # pid 1 runs: another build
    running.mkdir()
    other = parent / f".compile-fp32-{'0' * 16}.partial-{dead}"  # another engine's: kept
    other.mkdir()
    mine_before = parent / f".{k.folder(tmp_path).name}.partial-{socket.gethostname()}-{dead}"
    mine_before.mkdir()  # this host's, with the host in the name: removed
    remote = parent / f".{k.folder(tmp_path).name}.partial-other-host-{dead}"
    remote.mkdir()  # another host's on a shared volume: its pid means nothing here, kept
    cache.store(tmp_path, k, {"engine.bin": b"\x01"}, {})
    assert not stale.exists() and not mine_before.exists()
    assert running.exists() and other.exists() and remote.exists()
    assert cache.find(tmp_path, k) is not None


def test_leftover_names_that_are_no_process_are_kept_or_removed_safely(tmp_path):
    from musetalk_rt.leftovers import process_exists, remove_leftovers, temp_folder

    assert process_exists(os.getpid()) and not process_exists(2**62)
    odd = tmp_path / ".e.partial-notapid"  # not ours to judge: kept
    odd.mkdir()
    mine = temp_folder(tmp_path, "e")
    mine.mkdir()
    assert remove_leftovers(tmp_path, "e") == [mine] and odd.exists()
    with pytest.raises(ValueError, match="kind"):
        temp_folder(tmp_path, "e", "tmp")


_BUILD = """
import json, sys, time
from pathlib import Path
from musetalk_rt.weights import load_models
from musetalk_rt.engines.build import build_engines
models = load_models("tiny", device="cpu")
res = build_engines(models, "compile", "fp32", [2], cache_root=Path(sys.argv[1]),
                    log=lambda _: None, stages=("vae_decode",))
print(json.dumps({"cache": res.cache, "build_s": res.build_s, "passed": res.passed,
                  "stored": res.stored}))
"""


@pytest.mark.slow
def test_compile_cache_round_trip_in_fresh_processes(tmp_path):
    """Process 1 compiles (inductor, CPU) and stores; process 2, with an empty inductor cache
    of its own, loads the artifacts and reports a hit. One stage, the VAE decoder: the cache
    path is the same for both, and the UNet would add ~2.5 minutes on a 2-core CI host."""
    root = tmp_path / "models"
    out = []
    for i in range(2):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor{i}"))
        res = subprocess.run(
            [sys.executable, "-c", _BUILD, str(root)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    first, second = out
    assert first["passed"] and first["cache"] == {"vae_decode": "miss"}
    assert all(first["stored"].values())
    assert second["cache"] == {"vae_decode": "hit"} and second["passed"]
    assert second["stored"] == {"vae_decode": []}  # loaded, not stored again
    print("build seconds, cold vs from the cache:", first["build_s"], second["build_s"])
    assert len(cache.list_engines(root)) == 1


def _build(root, *extra):
    return main(
        ["engines", "build", "--weights", "tiny", "--device", "cpu", "--models-dir", str(root)]
        + list(extra)
    )


def test_engines_build_with_nothing_to_cache_and_list(tmp_path, capsys):
    root = tmp_path / "models"
    code = _build(root, "--dtype", "fp32", "--batch-sizes", "2", "--compile-backend", "aot_eager")
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["passed"] and summary["cache"] == {"unet": "miss", "vae_decode": "miss"}
    assert summary["stored"] == {"unet": [], "vae_decode": []}  # aot_eager leaves nothing
    assert main(["engines", "list", "--models-dir", str(root)]) == 0
    assert '"engines": 0' in capsys.readouterr().out
    code = _build(root, "--engine", "warp")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown engine 'warp'" in err and len(err.splitlines()) == 1


def test_engines_build_jobs_splits_into_children_that_each_store_and_report(tmp_path, capsys):
    """``engines build --jobs 2``: one child per stage (per stage and bucket for aoti/trt),
    two at once, each a plain ``engines build`` that gates and stores its own entry; the parent
    prints a line per child and one JSON line. A child that fails is named with its reason and
    the parent exits non-zero; bad input stops before any child starts."""
    from musetalk_rt.engines import parallel

    tasks = parallel.split_tasks(("unet", "vae_decode"), [4, 16, 4], per_bucket=True)
    assert [t.label for t in tasks] == ["unet b16", "vae_decode b16", "unet b4", "vae_decode b4"]
    assert [t.label for t in parallel.split_tasks(("unet",), [4, 16], per_bucket=False)] == [
        "unet b4,16"
    ]

    root = tmp_path / "models"
    argv = ["--dtype", "fp32", "--batch-sizes", "2", "--compile-backend", "aot_eager"]
    code = _build(root, "--jobs", "2", *argv)
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["passed"] and res["jobs"] == 2 and len(res["tasks"]) == 2
    assert {t["stage"]: t["cache"] for t in res["tasks"]} == {"unet": "miss", "vae_decode": "miss"}
    assert "2 builds, 2 at once" in out and out.count("gate pass") == 2
    for t in res["tasks"]:  # each child's own output is kept
        assert '"engines_build"' in Path(t["log"]).read_text()

    # children that fail: real weights that are not there; each named, with its own reason
    code = main(
        ["engines", "build", "--weights", "real", "--device", "cpu", "--jobs", "2", *argv]
        + ["--models-dir", str(tmp_path / "empty")]
    )
    captured = capsys.readouterr()
    assert code == 4 and "Traceback" not in captured.out + captured.err
    assert captured.out.count("FAILED (exit") == 2
    assert "2 of 2 builds failed (unet b2, vae_decode b2)" in captured.err
    # bad input: one line from the parent, no child started
    assert _build(root, "--jobs", "2", "--batch-sizes", "2", "--engine", "warp") == 2
    assert "unknown engine 'warp'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: not a positive integer
        _build(root, "--jobs", "0")
    assert exit_.value.code == 2 and "--jobs: must be at least 1" in capsys.readouterr().err


def test_live_and_engines_build_key_a_compile_engine_alike():
    """`engines build --compile-graph-capture manual` with the live run's options fills the
    cache entry the live process looks up (its compile engine defaults to the manual capture),
    so a host can build the engines first and start the live process from the cache."""
    from musetalk_rt.cli import _engine_options
    from musetalk_rt.cli import build_parser as cli_parser
    from musetalk_rt.engines.base import get_engine
    from musetalk_rt.live.app import build_parser as live_parser
    from musetalk_rt.live.app import live_engine_options

    opts = ["--compile-freezing", "--phase-upsample", "transpose", "--channels-last-norm"]
    common = ["--engine", "compile", "--dtype", "fp16", "--batch-sizes", "16,32", *opts]
    live = live_parser().parse_args([*common, "--channel", "c0=probe", "--delay-ms", "1500"])
    built = cli_parser().parse_args(
        ["engines", "build", *common, "--stages", "unet", "--compile-graph-capture", "manual"]
    )
    a = get_engine("compile", **live_engine_options(live))
    b = get_engine("compile", **_engine_options(built))
    for stage in ("unet", "vae_decode"):
        assert a.for_stage(stage).cache_options() == b.for_stage(stage).cache_options()
    assert a.cache_options()["graph_capture"] == "manual"
    plain = cli_parser().parse_args(["engines", "build", *common])  # trees: another entry
    assert get_engine("compile", **_engine_options(plain)).cache_options() != a.cache_options()
