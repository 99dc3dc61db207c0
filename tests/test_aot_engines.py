"""The ahead-of-time engines: ``aoti`` (torch.export + AOTInductor) and ``trt`` (torch-tensorrt).

On the CPU: the export of both stage modules with the exact bucket input specs, cache keys,
selection and fallback messages, and an ``engines build --engine aoti`` round trip through the
engine cache. TensorRT itself needs a GPU and torch-tensorrt (tests marked ``trt``).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from musetalk_rt import extras
from musetalk_rt.cli import main
from musetalk_rt.engines import aoti, get_engine, select_engine, trt
from musetalk_rt.errors import UserError
from musetalk_rt.stages import UNetStage, VaeDecodeStage

CPU = torch.device("cpu")
needs_trt = pytest.mark.skipif(
    not trt.trt_available(), reason="torch-tensorrt is not installed (make trt)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _stage_pair(models, engine="eager"):
    eng = get_engine(engine)
    return (
        UNetStage(models.unet, eng, torch.float32, CPU),
        VaeDecodeStage(models.vae, eng, torch.float32, CPU),
    )


def test_export_of_both_stages_has_the_bucket_input_specs(tiny_models):
    """What aoti compiles and trt hands to TensorRT: one static program per stage and bucket."""
    unet, vae = _stage_pair(tiny_models)
    for stage, buckets in ((unet, [2]), (vae, [1, 2])):
        m = aoti.prepare_module(stage.module, torch.float32, CPU)
        specs = trt.input_specs(stage.example_inputs, buckets, torch.float32)
        assert sorted(specs) == buckets
        for b in buckets:
            spec = stage.spec(b)
            want_in = [tuple(v) for k, v in spec.items() if k.startswith("in:")]
            want_out = [tuple(v) for k, v in spec.items() if k.startswith("out:")]
            assert specs[b] == [(s, torch.float32) for s in want_in]
            inputs = aoti.bucket_inputs(stage.example_inputs, b, torch.float32, CPU)
            assert all(x.is_inference() for x in inputs)
            program = aoti.export_bucket(m, inputs)
            placeholders = [
                n.meta["val"]
                for n in program.graph.nodes
                if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
            ]
            assert [(tuple(v.shape), v.dtype) for v in placeholders] == specs[b]
            out = program.module()(*inputs)
            assert [tuple(out.shape)] == want_out and out.dtype == torch.float32
            with torch.inference_mode():
                ref = stage.module(*inputs)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # the engine's copy is export-friendly; the reference keeps its 0-dim timestep
    assert unet.module.timestep.dim() == 0


def test_cache_keys_differ_per_engine(tiny_models):
    keys = {}
    for engine in ("eager", "compile", "aoti", "trt"):
        unet, vae = _stage_pair(tiny_models, engine)
        for stage in (unet, vae):
            key = stage.cache_key([2], tiny_models.fingerprint)
            assert key.folder(CPU.type).name.startswith(f"{engine}-fp32-")
            keys[(engine, stage.name)] = key.digest
    assert len(set(keys.values())) == len(keys)
    # graphs or not, the package is the same: one key (built once, loaded either way)
    assert (
        get_engine("aoti").cache_options() == get_engine("aoti", cuda_graphs=False).cache_options()
    )
    # where the weights live is part of the key: a package of the other kind is never loaded
    assert get_engine("aoti").cache_options() != get_engine("aoti", weights="so").cache_options()
    with pytest.raises(UserError, match="choose one of blob, so"):
        get_engine("aoti", weights="pickle")
    # max-autotune builds other kernels: its own key; the default key is unchanged by the option
    tuned = get_engine("aoti", max_autotune=True).cache_options()
    assert (
        tuned["max_autotune"] is True and "max_autotune" not in get_engine("aoti").cache_options()
    )


def test_aoti_compiles_with_the_picked_compiler_and_max_autotune(tmp_path, monkeypatch):
    """What reaches AOTInductor: the checked C++ compiler always, max-autotune when asked."""
    seen = {}

    def fake_compile_and_package(program, package_path, inductor_configs):
        seen.update(inductor_configs)
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile_and_package)
    eng = get_engine("aoti", max_autotune=True)
    eng._compile(None, (), tmp_path / "b1.pt2")
    assert seen["max_autotune"] is True and seen["cpp.cxx"][1].endswith("++")
    assert seen["aot_inductor.package_constants_in_so"] is False  # the blob layout
    assert eng.compiler_note.startswith("C++ compiler ")
    seen.clear()
    get_engine("aoti")._compile(None, (), tmp_path / "b1.pt2")
    assert "max_autotune" not in seen
    # --inductor-config's settings (tests/test_inductor_options.py) go in beside them
    get_engine("aoti", inductor_config="triton.enable_pdl=true")._compile(None, (), tmp_path / "x")
    assert seen["triton.enable_pdl"] is True and "cpp.cxx" in seen


def test_aoti_layout_freezing_and_tuning_options_reach_inductor_and_the_key(
    tmp_path, monkeypatch, tiny_models
):
    """The compile engine's best settings on an aoti package: each is in the inductor configs,
    in the cache key (absent when off, so keys of packages built before stay valid) and in the
    command-line mapping; a channels-last package gets channels-last example inputs."""
    seen = {}

    def fake_compile_and_package(program, package_path, inductor_configs):
        seen.update(inductor_configs, grad=torch.is_grad_enabled())
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fake_compile_and_package)
    opts = dict(channels_last=True, freezing=True, coordinate_descent=True)
    eng = get_engine("aoti", channels_last_norm=True, **opts)
    x = torch.zeros(1, 4, 8, 8)
    eng._compile(None, (x,), tmp_path / "b1.pt2")
    assert seen["freezing"] is True and seen["coordinate_descent_tuning"] is True
    assert seen["grad"] is False  # inductor freezes only a graph compiled without autograd
    assert seen["conv_1x1_as_mm"] is False  # a CUDA layout choice; on the CPU nothing changes
    key = eng.cache_options()
    assert all(key[k] is True for k in opts) and key["channels_last_norm"] is True
    plain = get_engine("aoti").cache_options()
    assert not set(opts) & set(plain) and "channels_last_norm" not in plain
    seen.clear()
    # off is said, not left to inductor's global config, which a notebook may have set
    # (config.patch, not monkeypatch: monkeypatch's undo deletes a torch config module's entry)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True, coordinate_descent_tuning=True):
        get_engine("aoti")._compile(None, (x,), tmp_path / "b1.pt2")
    assert seen["freezing"] is False and seen["coordinate_descent_tuning"] is False
    assert inductor_config.freezing is False  # the process's config is as it was
    # the example inputs a package is compiled for take the runner's memory format
    unet, vae = _stage_pair(tiny_models)
    for stage in (unet, vae):
        xs = aoti.bucket_inputs(stage.example_inputs, 2, torch.float32, CPU, torch.channels_last)
        assert [x.is_contiguous(memory_format=torch.channels_last) for x in xs if x.dim() == 4]
        assert all(x.is_contiguous() for x in xs if x.dim() != 4)
    # the command line: the compile engine's flags, --aoti-channels-last, --no-channels-last wins
    from musetalk_rt.cli import _engine_options, build_parser

    args = build_parser().parse_args(
        "engines build --engine aoti --compile-freezing --compile-cd-tuning --channels-last-norm "
        "--aoti-channels-last --aoti-cuda-graphs".split()
    )
    got = _engine_options(args)
    assert got == {
        "freezing": True,
        "coordinate_descent": True,
        "channels_last_norm": True,
        "channels_last": True,
        "cuda_graphs": True,
    }
    get_engine("aoti", **got)  # every option is one the engine takes
    args = build_parser().parse_args(
        "engines build --engine aoti --aoti-channels-last --no-channels-last".split()
    )
    assert _engine_options(args)["channels_last"] is False
    # graphs are the default on CUDA; --no-cuda-graphs turns them off for aoti as for compile
    args = build_parser().parse_args("engines build --engine aoti --no-cuda-graphs".split())
    assert get_engine("aoti", **_engine_options(args)).cuda_graphs is False


def test_aoti_loads_single_threaded_when_it_captures_cuda_graphs(tmp_path, monkeypatch):
    """A CUDA graph can capture only the single-threaded AOTInductor runner (the default one's
    thread synchronisation invalidated the capture on an H200); graphs are the default on CUDA,
    and a bench row records whether they ran (the package, and its cache key, is the same)."""
    seen = []
    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", lambda *a: seen.append(a))
    get_engine("aoti")._load(tmp_path / "b4.pt2", capture=True)
    get_engine("aoti")._load(tmp_path / "b4.pt2")  # no capture (the CPU, --no-cuda-graphs)
    path = str(tmp_path / "b4.pt2")
    assert seen == [(path, "model", True, 1, -1), (path, "model", False, 1, -1)]
    # torch whose loader takes other arguments, or has another name: the public call, with
    # the same choice of runner
    monkeypatch.setattr(
        torch._inductor, "aoti_load_package", lambda path, **kw: seen.append(kw) or path
    )

    def other_signature(*args):
        raise TypeError("AOTIModelPackageLoader(): incompatible constructor arguments")

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", other_signature)
    get_engine("aoti")._load(tmp_path / "b4.pt2")
    assert seen[-1] == {"run_single_threaded": False}
    monkeypatch.delattr(torch._C._aoti, "AOTIModelPackageLoader")
    get_engine("aoti")._load(tmp_path / "b4.pt2", capture=True)
    assert seen[-1] == {"run_single_threaded": True}
    assert get_engine("aoti").cuda_graphs is True
    assert get_engine("aoti").row_options("cuda")["cuda_graphs"] is True
    assert get_engine("aoti", cuda_graphs=False).row_options("cuda")["cuda_graphs"] is False
    assert get_engine("aoti").row_options("cpu")["cuda_graphs"] is False  # nothing captured
    assert "cuda_graphs" not in get_engine("aoti").cache_options()


def test_aoti_build_on_the_cpu_loads_the_runner_that_does_not_capture(monkeypatch):
    """Graphs are captured on CUDA only: a CPU build loads the default runner, calls it once
    and keeps it (export and compilation are stood in for: this checks the build loop)."""
    eng = get_engine("aoti")  # cuda_graphs=True, the default
    monkeypatch.setattr(aoti, "export_bucket", lambda module, inputs: None)
    monkeypatch.setattr(eng, "_compile", lambda program, inputs, path: path)
    loaded, calls = [], []

    def load(path, capture=False):
        loaded.append((path.name, capture))
        return lambda x: calls.append(x.shape) or x * 2

    monkeypatch.setattr(eng, "_load", load)
    runner = eng.build(
        torch.nn.Linear(3, 3), lambda b: (torch.zeros(b, 3),), [2], torch.float32, CPU
    )
    assert loaded == [("b2.pt2", False)] and calls == [(2, 3)]  # loaded, then one first call
    assert torch.equal(runner(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    assert "CUDA graphs" not in runner.report.reason


def _stand_in_packages(monkeypatch) -> list[str]:
    """aoti's export, compilation and loading stood in for: a "package" is a file naming the
    prepared module, kept in memory here. Returns the log of files compiled."""
    modules, compiled = {}, []

    def compile_bucket(self, program, inputs, path):
        token = f"{len(modules)}:{path.name}"
        modules[token] = program  # the prepared module itself (export_bucket below)
        path.write_text(token)
        compiled.append(path.name)
        return path

    monkeypatch.setattr(aoti, "export_bucket", lambda module, inputs: module)
    monkeypatch.setattr(aoti.AotiEngine, "_compile", compile_bucket)
    monkeypatch.setattr(
        aoti.AotiEngine, "_load", lambda self, path, capture=False: modules[Path(path).read_text()]
    )
    return compiled


def test_aoti_buckets_built_apart_serve_together_from_the_engine_cache(
    tiny_models, tmp_path, monkeypatch, capsys
):
    """Each aoti bucket is its own cache entry: buckets built in separate processes (the way
    to build several at once) or on separate days serve a process that asks for all of them;
    a build of a set loads the cached buckets and builds only the rest. A live process with a
    bucket missing names the stages and the buckets it lacks."""
    from musetalk_rt.engines import cache
    from musetalk_rt.engines.build import build_engines
    from musetalk_rt.pipeline import FaceGenerator

    compiled = _stand_in_packages(monkeypatch)
    root = tmp_path / "models"
    quiet = {"cache_root": root, "log": lambda _: None}
    for b in (2, 3):
        res = build_engines(tiny_models, "aoti", "fp32", [b], **quiet)
        assert res.passed and res.cache == {"unet": "miss", "vae_decode": "miss"}
        for (folder,) in res.stored.values():  # one folder per stage, holding this bucket
            assert sorted(p.name for p in Path(folder).iterdir()) == [f"b{b}.pt2", "meta.json"]
    assert compiled == ["b2.pt2", "b2.pt2", "b3.pt2", "b3.pt2"]
    gen = FaceGenerator(tiny_models, "aoti", "fp32", [2, 3], log=lambda _: None)
    assert gen.missing_prebuilt(root) == {}
    reports = gen.prepare(root, build_command="(not printed: every bucket is cached)")
    assert [r.cache for r in reports] == ["hit", "hit"] and len(compiled) == 4
    assert all("2 loaded from the engine cache, 0 built" in r.reason for r in reports)

    # a set with one bucket cached: that one loaded, the other built and stored alone
    res = build_engines(tiny_models, "aoti", "fp32", [3, 5], **quiet)
    assert res.passed and res.cache == {"unet": "partial", "vae_decode": "partial"}
    assert compiled[4:] == ["b5.pt2", "b5.pt2"]
    for (folder,) in res.stored.values():  # one folder each, holding b5 alone
        assert sorted(p.name for p in Path(folder).iterdir()) == ["b5.pt2", "meta.json"]
    res = build_engines(tiny_models, "aoti", "fp32", [2, 3, 5], **quiet)
    assert res.cache == {"unet": "hit", "vae_decode": "hit"} and res.stored == {
        "unet": [],
        "vae_decode": [],
    }
    assert len(compiled) == 6

    # an entry of a whole set, as these engines were stored before: found for that set
    unet = gen.unet
    whole = unet.cache_key([7, 8], tiny_models.fingerprint)
    cache.store(root, whole, {"b7.pt2": b"", "b8.pt2": b""}, {})
    assert unet.cache_entries([7, 8], root, tiny_models.fingerprint) == ([whole.folder(root)], [])
    assert unet.cache_entries([2, 8], root, tiny_models.fingerprint)[1] == [8]

    # the live process's refusal names each stage's missing buckets
    only_unet = tmp_path / "unet_only"
    build_engines(
        tiny_models, "aoti", "fp32", [4], stages=("unet",), cache_root=only_unet, log=print
    )
    gen = FaceGenerator(tiny_models, "aoti", "fp32", [2, 4], log=lambda _: None)
    assert gen.missing_prebuilt(only_unet) == {"unet": [2], "vae_decode": [2, 4]}
    with pytest.raises(UserError) as err:
        gen.prepare(only_unet, build_command="musetalk-rt engines build ...")
    assert "engine for unet at batch size 2 and vae_decode at batch sizes 2,4 in" in str(err.value)


def test_engines_build_one_stage_gates_it_against_the_reference_of_the_other(tiny_models, capsys):
    """``--stages unet`` builds and gates the UNet alone (the VAE runs as the fp32 reference),
    so two slow builds can run in two processes; an unknown stage is one clear error."""
    from musetalk_rt.engines.build import build_engines

    res = build_engines(tiny_models, "eager", "fp32", [2], stages=("unet",), log=lambda _: None)
    assert set(res.cache) == {"unet"} and res.passed and res.quality[2]["psnr_db"] > 40
    with pytest.raises(UserError, match="choose from unet, vae_decode"):
        build_engines(tiny_models, "eager", "fp32", [2], stages=("vae",), log=lambda _: None)
    # on the command line: one line, before any weights are loaded
    assert main(["engines", "build", "--weights", "tiny", "--stages", "unet,vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "musetalk-rt: error: --stages unet,vae: choose from unet, vae_decode"


def test_selection_messages_and_fallbacks():
    if not trt.trt_available():
        with pytest.raises(UserError) as err:
            select_engine("trt", "cpu", torch.float32)
        assert trt.INSTALL_HINT in str(err.value) and "\n" not in str(err.value)
        assert f"pip install '{extras.trt_install_spec()}'" in trt.INSTALL_HINT
    logged = []
    engine, reason = select_engine("trt", "cpu", torch.float32, fallback="aoti", log=logged.append)
    assert engine.name == "aoti" and reason.startswith("fallback from 'trt': ") and logged
    engine, reason = select_engine("aoti", "cpu", torch.float32)
    assert engine.name == "aoti" and "usable on cpu" in reason
    with pytest.raises(UserError, match="fp16"):
        select_engine("aoti", "cpu", torch.float16)
    with pytest.raises(UserError, match="engine 'aoti' does not take the options backend"):
        get_engine("aoti", backend="aot_eager")


def test_trt_install_spec_pins_the_release_made_for_this_torch():
    """Each torch-tensorrt release requires one torch minor version: the hint and ``make trt``
    name that release, never an unpinned one that would replace torch."""
    assert extras.trt_install_spec("2.13.0+cpu") == "torch-tensorrt==2.13.*"
    assert extras.trt_install_spec("2.11.1+cu130") == "torch-tensorrt==2.11.*"
    assert extras.trt_install_spec("2.14.0") == "torch-tensorrt==2.14.*"
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert extras.trt_install_spec() == f"torch-tensorrt=={major_minor}.*"  # (torch's metadata)
    assert extras.trt_install_spec("2.12.1+cu130") == "torch-tensorrt==2.12.*"


def test_trt_compile_settings_follow_the_installed_releases_signature(tmp_path):
    """The build's keywords per torch-tensorrt release (signatures as the releases define them):
    the inputs' GPU and a timing cache of this build's own always; explicit typing asked for
    only where it is off by default; ``enabled_precisions`` never."""
    dev = torch.device("cuda", 1)
    cache = tmp_path / "b4.timing_cache.bin"

    def release_2_10(gm, arg_inputs=(), *, device=None, enabled_precisions=(),
                     use_explicit_typing=False, min_block_size=5, workspace_size=0,
                     timing_cache_path="/tmp/torch_tensorrt_engine_cache/timing_cache.bin",
                     **kwargs):  # fmt: skip
        pass

    def release_2_12(gm, arg_inputs=(), *, device=None, enabled_precisions=(),
                     use_explicit_typing=True, min_block_size=5, workspace_size=0,
                     timing_cache_path="/tmp/torch_tensorrt_engine_cache/timing_cache.bin",
                     **kwargs):  # fmt: skip
        pass

    def release_2_13(gm, arg_inputs=(), *, device=None, min_block_size=5, workspace_size=0,
                     timing_cache_path="/tmp/torch_tensorrt_engine_cache/timing_cache.bin",
                     **kwargs):  # fmt: skip
        pass

    old = trt.compile_settings(release_2_10, dev, cache, 1 << 30)
    assert old == {
        "device": dev, "min_block_size": 1, "timing_cache_path": str(cache),
        "use_explicit_typing": True, "workspace_size": 1 << 30,
    }  # fmt: skip
    for release in (release_2_12, release_2_13):
        s = trt.compile_settings(release, dev, cache)
        assert s == {"device": dev, "min_block_size": 1, "timing_cache_path": str(cache)}
    assert all("enabled_precisions" not in trt.compile_settings(r, dev, cache)
               for r in (release_2_10, release_2_12, release_2_13))  # fmt: skip


def test_trt_partition_summary_counts_engines_and_what_pytorch_kept():
    """torch-tensorrt's partitions: ``_run_on_acc_<i>`` are engines, ``_run_on_gpu_<i>`` ops it
    left to PyTorch; the build's report says how many of each."""
    gm = torch.nn.Module()
    for name in ("_run_on_acc_0", "_run_on_gpu_1", "_run_on_acc_2", "other"):
        gm.add_module(name, torch.nn.Identity())
    assert trt.partition_summary(gm) == (2, 1)
    assert trt.partition_summary(torch.nn.Module()) == (0, 0)


def test_trt_cache_key_holds_both_versions(monkeypatch):
    """An engine runs only in the TensorRT that built it: another TensorRT is another key (and
    the versions are None where the libraries are missing, as here)."""
    key = get_engine("trt").cache_options()
    if not trt.trt_available():
        assert key["torch_tensorrt"] is None and key["tensorrt"] is None
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "10.13.2")
    a = get_engine("trt").cache_options()
    monkeypatch.setattr(trt, "tensorrt_version", lambda: "10.14.1")
    b = get_engine("trt").cache_options()
    assert a["tensorrt"] == "10.13.2" and a != b


@pytest.mark.skipif(trt.trt_available(), reason="torch-tensorrt is installed here")
def test_engines_build_trt_without_tensorrt_is_one_line(tmp_path, capsys):
    argv = ["engines", "build", "--engine", "trt", "--weights", "tiny", "--device", "cpu"]
    code = main(argv + ["--models-dir", str(tmp_path / "models")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"pip install '{extras.trt_install_spec()}'" in err and "--engine compile" in err
    assert "--engine aoti" in err


def test_engines_in_help_texts(capsys):
    from musetalk_rt.live.app import build_parser as live_parser

    for argv in (["render", "--help"], ["bench", "--help"], ["engines", "build", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "aoti" in out and "trt" in out, argv
    assert "aoti" in live_parser().format_help() and "trt" in live_parser().format_help()


@pytest.mark.slow
def test_engines_build_aoti_round_trip_through_the_cache(tmp_path, capsys, monkeypatch):
    """``engines build --engine aoti`` on the tiny weights, twice: the second build loads the
    packages from the engine cache without exporting or compiling (or torch's CPU probe).

    Slow: AOTInductor compiles C++ for both stages, about 100 s on 2 CPU cores with optimised
    C++ and about 60 s unoptimised; the test asks for unoptimised C++
    (``TORCHINDUCTOR_DEBUG_COMPILE``) to stay near a minute. Its exports alone are covered by
    ``test_export_of_both_stages_has_the_bucket_input_specs``.
    """
    monkeypatch.setenv("TORCHINDUCTOR_DEBUG_COMPILE", "1")
    root = tmp_path / "models"
    argv = ["engines", "build", "--engine", "aoti", "--weights", "tiny", "--device", "cpu"]
    argv += ["--dtype", "fp32", "--batch-sizes", "2", "--models-dir", str(root)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["passed"] and first["cache"] == {"unet": "miss", "vae_decode": "miss"}
    for stage, (folder,) in first["stored"].items():
        files = sorted(p.name for p in (root / "engines" / stage).glob("aoti-*/*"))
        assert files == ["b2.pt2", "meta.json"], (stage, folder)
        # the default keeps the weights in a blob beside a small shared object (the shared
        # object with the weights inside segfaulted at load on an H200)
        with zipfile.ZipFile(Path(folder) / "b2.pt2") as z:
            names = z.namelist()
        assert any(n.endswith("_weights.blob") for n in names), names

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the engine cache has the packages")

    def no_probe(*args, **kwargs):
        raise AssertionError("probed the CPU's features (~40 s on an H200 host) to load")

    monkeypatch.setattr(aoti, "export_bucket", no_export)
    monkeypatch.setattr(torch._inductor.codecache, "get_device_information", no_probe)
    assert main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["passed"] and second["cache"] == {"unet": "hit", "vae_decode": "hit"}
    print("build seconds, cold vs from the cache:", first["build_s"], second["build_s"])
    # render, bench and live build through FaceGenerator: the same cached packages
    from musetalk_rt.pipeline import FaceGenerator
    from musetalk_rt.weights import load_models

    gen = FaceGenerator(load_models("tiny", device="cpu"), "aoti", "fp32", [2], log=print)
    reports = gen.prepare(root, build_command="(not printed: the engines are in the cache)")
    assert [r.cache for r in reports] == ["hit", "hit"]
    assert all("1 loaded from the engine cache, 0 built" in r.reason for r in reports)


def _static_cxx(tmp_path: Path) -> str:
    """A compiler that links its own static copy of libstdc++ into shared objects."""
    import shutil

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("needs g++ (apt-get install g++; .ci/run installs it)")
    wrapper = tmp_path / "g++-static"
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} "$@" -static-libstdc++ -static-libgcc\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_static_libstdcxx_package_crashes_next_to_torch_and_is_never_built(tmp_path):
    """Why aoti picks its compiler: a shared object with its own static libstdc++ dies in
    std::regex (AOTInductor's device-string parser) once torch is loaded — an H200 host's $CXX
    did that to every package. The probe tells such a compiler apart; pick_cxx skips it and
    names the fix when nothing else is there."""
    import subprocess
    import sys

    static = _static_cxx(tmp_path)
    so = tmp_path / "probe.so"
    src = tmp_path / "probe.cpp"
    src.write_text(aoti._CXX_PROBE)
    subprocess.run([static, "-shared", "-fPIC", "-std=c++17", str(src), "-o", str(so)], check=True)
    load = f"import ctypes, torch; print(ctypes.CDLL({str(so)!r}).probe(b'cuda:0'))"
    crashed = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True)
    assert crashed.returncode != 0  # abort (bad_cast) or segfault, depending on the host

    assert aoti.links_libstdcxx_dynamically(static) is False
    assert aoti.links_libstdcxx_dynamically("g++") is True
    cxx, note = aoti.pick_cxx([static, "g++"])
    assert cxx.endswith("g++") and "statically: skipped" in note
    with pytest.raises(UserError, match="apt-get install g\\+\\+.*--engine compile"):
        aoti.pick_cxx([static, str(tmp_path / "no-such-compiler")])


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
@needs_cuda
def test_trt_builds_caches_and_passes_the_gate_on_a_gpu(tmp_path):
    from musetalk_rt.engines.build import build_engines
    from musetalk_rt.weights import load_models

    models = load_models("tiny", device="cuda")
    first = build_engines(models, "trt", "fp16", [2], cache_root=tmp_path, log=lambda _: None)
    assert first.passed and all(first.stored.values())
    second = build_engines(models, "trt", "fp16", [2], cache_root=tmp_path, log=lambda _: None)
    assert second.passed and second.cache == {"unet": "hit", "vae_decode": "hit"}


def test_render_and_live_refuse_a_missing_prebuilt_engine(
    yongen_avatar, fixture_file, tmp_path, capsys
):
    """``aoti`` is built ahead by ``engines build``: without it, one line naming that command."""
    from musetalk_rt.live.app import main as live_main

    models_dir = tmp_path / "models"
    common = ["--engine", "aoti", "--dtype", "fp32", "--weights", "tiny", "--device", "cpu"]
    common += ["--models-dir", str(models_dir), "--avatars-dir", str(yongen_avatar)]
    render = ["render", "--avatar", "yongen", "--audio", str(fixture_file("eng.wav"))]
    render += ["--out", str(tmp_path / "o.mp4"), "--batch-size", "2"]
    live = ["--avatar", "yongen", "--record", str(tmp_path / "r.mp4"), "--batch-sizes", "4,2"]
    live += ["--no-cuda-graphs"]  # engine options are part of the command too
    for run, argv, buckets in (
        (main, render + common, "2"),
        (live_main, live + common + ["--token", "t"], "2,4"),
    ):
        code = run(argv)
        err = capsys.readouterr().err.strip()
        assert code != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "no prebuilt aoti/fp32 engine for unet and vae_decode" in err, err
        want = (
            f"musetalk-rt engines build --engine aoti --dtype fp32 --batch-sizes {buckets} "
            f"--weights tiny --models-dir {models_dir} --device cpu"
        )
        assert want in err, err
    assert err.endswith("--no-cuda-graphs")  # live's last: its engine options carried over
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "r.mp4").exists()
    assert not models_dir.exists() or not any(models_dir.rglob("*.pt2"))  # nothing was built
