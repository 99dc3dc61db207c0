"""Engines: selection, parity against fp32 eager, bucket padding."""

import pytest
import torch

from musetalk_rt.engines import available_engines, get_engine, select_engine
from musetalk_rt.engines.parity import check_parity, psnr_u8
from musetalk_rt.errors import UserError
from musetalk_rt.stages import FrameBatch, ToHostStage, UNetStage, VaeDecodeStage

CPU = torch.device("cpu")


def _stages(models, engine, dtype, buckets):
    u = UNetStage(models.unet, engine, dtype, CPU)
    v = VaeDecodeStage(models.vae, engine, dtype, CPU)
    u.prepare(buckets)
    v.prepare(buckets)
    return u, v


def test_registry_and_unknown_engine():
    assert {"eager", "compile"} <= set(available_engines())
    with pytest.raises(UserError, match="unknown engine 'warp'.*eager"):
        get_engine("warp")


def test_unusable_engine_needs_explicit_fallback(monkeypatch):
    from musetalk_rt.engines import base

    class NeedsGpu(base.Engine):
        name = "needs_gpu"

        def unavailable_reason(self, device, dtype):
            return "needs CUDA: run on a GPU host"

        def build(self, *args):
            raise AssertionError("never built on CPU")

    monkeypatch.setitem(base._REGISTRY, "needs_gpu", NeedsGpu)
    with pytest.raises(UserError, match="needs CUDA.*--fallback eager"):
        select_engine("needs_gpu", "cpu", torch.float32)
    logged = []
    engine, reason = select_engine(
        "needs_gpu", "cpu", torch.float32, fallback="eager", log=logged.append
    )
    assert engine.name == "eager"
    assert reason.startswith("fallback from 'needs_gpu': needs CUDA") and logged
    with pytest.raises(UserError, match="fp16"):  # a fallback that cannot run either
        select_engine("needs_gpu", "cpu", torch.float16, fallback="eager")
    # a misspelt fallback is found now, not on the day the engine cannot run
    monkeypatch.setattr(NeedsGpu, "unavailable_reason", lambda self, d, t: None)
    with pytest.raises(UserError, match="unknown engine 'eagr'"):
        select_engine("needs_gpu", "cpu", torch.float32, fallback="eagr")
    # commands without --fallback do not suggest it
    monkeypatch.setattr(NeedsGpu, "unavailable_reason", lambda self, d, t: "needs CUDA")
    with pytest.raises(UserError) as err:
        select_engine("needs_gpu", "cpu", torch.float32, fix_hint="")
    assert "--fallback" not in str(err.value)
    # nor where the fallback could not run either: eager itself, or eager at fp16 on a CPU
    for name, dtype in (("eager", torch.float16), ("needs_gpu", torch.float16)):
        with pytest.raises(UserError, match="cannot run here") as err:
            select_engine(name, "cpu", dtype)
        assert "--fallback" not in str(err.value)


def test_a_compile_fallback_gets_its_options_and_the_live_capture(monkeypatch):
    """The fallback takes the options it has (the live default capture included) and the
    reason names those it does not."""
    from musetalk_rt.engines import base

    class NeedsGpu(base.Engine):
        name = "needs_gpu"

        def __init__(self, freezing: bool = False, workspace_gb: int = 4):
            self.freezing = freezing

        def unavailable_reason(self, device, dtype):
            return "needs CUDA"

        def build(self, *args):
            raise AssertionError("never built here")

    monkeypatch.setitem(base._REGISTRY, "needs_gpu", NeedsGpu)
    engine, reason = select_engine(
        "needs_gpu", "cpu", torch.float32, fallback="compile", freezing=True,
        workspace_gb=8, fallback_options={"graph_capture": "manual"},
    )  # fmt: skip
    assert engine.name == "compile" and engine.freezing is True
    assert engine.graph_capture == "manual"
    assert reason.endswith("compile does not take workspace_gb")


def test_a_few_nan_pixels_fail_the_gate_whatever_the_psnr(tiny_models):
    """NaN becomes 0 in uint8; ten such pixels in a batch of 2 still score ~58 dB."""
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])

    def nan_vae(lat):
        out = ref_v.run(lat).clone()
        out[0, :, :2, :5] = float("nan")
        return out

    res = check_parity(ref_u.run, ref_v.run, ref_u.run, nan_vae, 2, CPU)
    assert res.psnr_db >= 40 and not res.finite and not res.passed


def test_the_gate_reference_runs_in_ieee_fp32_and_the_candidate_as_configured(tiny_models):
    """torch lets cuDNN convolutions use TF32 by default; the reference must not (on a GPU it
    would be a 10-bit-mantissa approximation), and the flags come back for the candidate."""
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])
    flags = []

    def seen(run):
        def wrapped(x, *rest):
            flags.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return run(x, *rest)

        return wrapped

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        check_parity(seen(ref_u.run), seen(ref_v.run), seen(ref_u.run), seen(ref_v.run), 2, CPU)
        assert flags[:2] == [(False, False)] * 2  # the reference: UNet, then VAE
        assert flags[2:] == [(True, before[1])] * 2  # the candidate: as the process had them
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_eager_fp32_is_the_reference_and_bf16_passes_gate(tiny_models):
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])
    same = check_parity(ref_u.run, ref_v.run, ref_u.run, ref_v.run, 2, CPU)
    assert same.psnr_db == 100.0 and same.latent_rel_err == 0.0
    u, v = _stages(tiny_models, get_engine("eager"), torch.bfloat16, [2])
    res = check_parity(ref_u.run, ref_v.run, u.run, v.run, 2, CPU)
    assert res.passed and 0 < res.latent_rel_err < 0.05 and res.psnr_db >= 40


def test_compile_engine_buckets_pad_and_split(tiny_models):
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])
    # aot_eager keeps dynamo's fullgraph capture and AOT tracing while staying CPU-cheap.
    u, v = _stages(tiny_models, get_engine("compile", backend="aot_eager"), torch.float32, [2, 4])
    assert u.runner.buckets == [2, 4] and u.runner.report.build_s.keys() == {2, 4}
    for b in (2, 3, 4, 7):  # 3 pads to 4; 7 splits into 4 + 3 (padded)
        res = check_parity(ref_u.run, ref_v.run, u.run, v.run, b, CPU)
        assert res.passed and res.latent_rel_err < 1e-4, (b, res)


def test_a_padded_batch_reaches_a_compiled_bucket_in_its_memory_format():
    """A partial batch is padded, then put in the bucket's memory format: no re-compile.

    Seen on an H200: a render whose last batch was partial re-compiled the UNet and the VAE
    (dynamo: "stride mismatch at index 1"), because the padding returned NCHW memory.
    """
    from torch._dynamo.utils import counters

    from musetalk_rt.engines.base import EngineReport, Runner

    conv = torch.nn.Conv2d(8, 4, 3, padding=1).to(memory_format=torch.channels_last).eval()
    compiled = torch.compile(conv, backend="eager", fullgraph=True, dynamic=False)
    seen = []

    def bucket_fn(x):
        seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return compiled(x)

    report = EngineReport("compile", "fp32", "cpu", [4])
    runner = Runner({4: bucket_fn}, torch.float32, report, memory_format=torch.channels_last)
    assert runner.buckets == [4]
    with torch.inference_mode():  # the build's call, as the compile engine makes it
        bucket_fn(torch.randn(4, 8, 32, 32).contiguous(memory_format=torch.channels_last))
    graphs = counters["stats"]["unique_graphs"]
    # NCHW latents, as a render passes them: 3, 2 and 1 are padded to 4; 5 splits into 4 + 1
    for b in (4, 3, 2, 1, 5):
        x = torch.randn(b, 8, 32, 32)
        out = runner(x)
        assert out.shape == (b, 4, 32, 32)
        torch.testing.assert_close(out, conv(x))
    assert seen == [True] * 7
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled again


def test_to_host_mapping_matches_musetalk():
    images = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.2]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    faces = ToHostStage(CPU)(FrameBatch([0], [0], images=images)).faces
    assert faces.dtype.name == "uint8" and faces.shape == (1, 1, 5, 3)
    assert faces[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_psnr():
    a = torch.zeros(4, 4, dtype=torch.uint8)
    assert psnr_u8(a, a) == 100.0
    assert 48 < psnr_u8(a, a + 1) < 49


def test_compile_options_from_cli_reach_the_engine_and_its_cache_key():
    from musetalk_rt.cli import _engine_options, build_parser

    args = build_parser().parse_args(
        [
            "bench",
            "--compile-fuse-qkv",
            "--compile-cudnn-benchmark",
            "--compile-graph-capture",
            "manual",
            "--fuse-stages",
        ]
    )
    opts = _engine_options(args)
    assert opts == {"fuse_qkv": True, "cudnn_benchmark": True, "graph_capture": "manual"}
    assert args.fuse_stages
    engine, _ = select_engine("compile", "cpu", torch.float32, **opts)
    key = engine.cache_options()
    assert key["fuse_qkv"] and key["cudnn_benchmark"] and key["graph_capture"] == "manual"
    assert key != get_engine("compile").cache_options()
    assert _engine_options(build_parser().parse_args(["bench"])) == {}
    with pytest.raises(UserError, match="graph capture 'cuda'"):
        get_engine("compile", graph_capture="cuda")


def test_compile_fuse_qkv_fuses_the_engine_copy_only(tiny_models):
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])
    engine = get_engine("compile", backend="aot_eager", fuse_qkv=True, cudnn_benchmark=True)
    u, v = _stages(tiny_models, engine, torch.float32, [2])
    for stage in (u, v):
        assert "fused qkv (" in stage.runner.report.reason
        assert "fused qkv (0 " not in stage.runner.report.reason
    res = check_parity(ref_u.run, ref_v.run, u.run, v.run, 2, CPU)
    assert res.passed and res.latent_rel_err < 1e-4, res
    # the reference modules are untouched
    for model in (tiny_models.unet, tiny_models.vae):
        assert not any(getattr(m, "fused_projections", False) for m in model.modules())


def test_bench_fused_stages_one_module_and_gpu_turns(tiny_models, tmp_path):
    from musetalk_rt.bench import GpuTurns, run_bench, table

    turns = GpuTurns(tmp_path / "turns", peers=2, deadline_s=0.0)  # the peer never comes
    rows = run_bench(
        tiny_models,
        ["compile"],
        ["fp32"],
        [2],
        warmup=1,
        iters=2,
        engine_options={"compile": {"backend": "aot_eager", "fuse_qkv": True}},
        log=lambda line: None,
        fuse_stages=True,
        turns=turns,
    )
    (row,) = rows
    assert row["stages"] == "unet+vae_decode (fused)"
    assert row["unet_p50_ms"] is None and row["vae_decode_p50_ms"] is None
    assert row["quality"]["passed"] and row["quality"]["latent_rel_err"] < 1e-4
    assert row["engine_options"]["fuse_qkv"] and row["gpu_p50_ms"] is None
    assert "overlap_fps" not in row  # stages overlapped: CUDA and separate stages only
    assert "sustained_fps" not in row and "sm_clock_mhz" not in row  # CUDA only
    assert row["gpu_turns"] == {"peers": 2, "ready_peers": 1}
    head, _, line = table(rows).splitlines()[:3]
    assert "sust ms" in head and line.startswith("compile-fp32-b2")
    assert line.split()[5:7] == ["-", "-"]  # no sustained time, no clock off CUDA
    assert row["peak_mem_mb"] is None and row["peak_mem_mb_by_phase"] is None  # CUDA only


def test_a_failed_build_marks_its_process_ready_and_a_finished_one_waits(tmp_path):
    from musetalk_rt.bench import GpuTurns, building

    failed = GpuTurns(tmp_path / "turns", peers=2, deadline_s=0.0)
    with pytest.raises(RuntimeError, match="out of memory"), building(failed):
        raise RuntimeError("out of memory")
    assert failed.ready_peers is None and len(list((tmp_path / "turns").glob("ready.*"))) == 1
    built = GpuTurns(tmp_path / "turns", peers=2, deadline_s=0.0)
    with building(built, log=lambda line: None):
        pass
    assert built.ready_peers == 1  # marked ready and waited (the deadline passed at once)
    with building(None):  # no turns: nothing to mark or wait for
        pass


def test_phase_peaks_split_the_allocators_peak_and_restart_it(monkeypatch):
    from musetalk_rt import bench

    allocated = {"peak": 0}  # the allocator's running peak, in bytes
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocated["peak"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda device: allocated.update(peak=0)
    )
    peaks = bench._PhasePeaks(torch.device("cuda"))
    for phase, mib in (("build", 300), ("gate", 900), ("timing", 500)):
        allocated["peak"] = mib * 2**20
        peaks.end(phase)
        assert allocated["peak"] == 0  # the next phase starts from nothing
    assert peaks.mb == {"build": 300, "gate": 900, "timing": 500}
    assert peaks.overall() == 900 and peaks.overall("build", "timing") == 500
    off_cuda = bench._PhasePeaks(torch.device("cpu"))
    off_cuda.end("build")
    assert off_cuda.mb == {} and off_cuda.overall() is None


def test_each_row_takes_its_own_gate_and_timing_peaks(tiny_models, monkeypatch):
    from musetalk_rt import bench

    # a fake allocator (MiB): the build leaves a 700 peak; each batch's gate and timing raise
    # it by their own figures; the timing's own reading before the priority passes is given
    alloc = {"peak": 700}
    figures = {2: (900, 500, 400), 4: (300, 1200, 1100)}  # batch: gate, timing, before prio

    class FakePeaks(bench._PhasePeaks):
        def end(self, phase):
            self.mb[phase], alloc["peak"] = alloc["peak"], 0

    def gate(*args, **kwargs):
        result = real_gate(*args, **kwargs)
        alloc["peak"] = max(alloc["peak"], figures[args[4]][0])
        return result

    def measure(unet, vae, b, *args):
        per_stage, total, gpu, overlap = real_measure(unet, vae, b, *args)
        alloc["peak"] = max(alloc["peak"], figures[b][1])
        return per_stage, total, gpu, overlap | {"peak_mem_mb_before_priorities": figures[b][2]}

    real_gate, real_measure = bench.check_parity, bench._measure
    monkeypatch.setattr(bench, "_PhasePeaks", FakePeaks)
    monkeypatch.setattr(bench, "check_parity", gate)
    monkeypatch.setattr(bench, "_measure", measure)
    rows = bench.run_bench(
        tiny_models, ["eager"], ["fp32"], [2, 4], warmup=1, iters=2, log=lambda line: None
    )
    got = [
        (
            r["batch"],
            r["peak_mem_mb_by_phase"],
            r["peak_mem_mb"],
            r["peak_mem_mb_before_priorities"],
        )
        for r in rows
    ]
    assert got == [
        (2, {"build": 700, "gate": 900, "timing": 500}, 900, 900),
        (4, {"build": 700, "gate": 300, "timing": 1200}, 1200, 1100),  # not batch 2's gate
    ]


def test_gpu_turns_lift_the_memory_cap_while_timing(tmp_path, monkeypatch):
    """Five peers cap each process at 18% of the card; a B32 timing turn needs more (it died
    of that cap on an H100), so the turn lifts it once no peer is building, hands the cached
    blocks back after it and caps again."""
    import torch

    from musetalk_rt.bench import GpuTurns

    calls = []
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda f, i: calls.append((f, i))
    )
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: calls.append(("sync", i)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    turns = GpuTurns(tmp_path / "turns", peers=5, deadline_s=0.0)
    turns.limit_memory(torch.device("cuda", 1))
    assert calls == [(0.18, 1)]
    turns.wait(log=lambda line: None)  # the deadline passed: 1 of 5 ready, the others build
    with turns.turn():
        pass
    assert calls == [(0.18, 1)]  # not lifted beside peers that still build
    for pid in range(4):
        (tmp_path / "turns" / f"ready.{pid}").touch()
    with turns.turn():
        assert calls[-1] == (1.0, 1)
    assert calls[1:] == [(1.0, 1), ("sync", 1), "empty_cache", (0.18, 1)]
    with pytest.raises(RuntimeError), turns.turn():  # capped again when the timing fails too
        raise RuntimeError("out of memory")
    assert calls[-1] == (0.18, 1)
    # one process alone and CPU runs are never capped, so their turns change nothing
    calls.clear()
    for peers, device in ((1, torch.device("cuda", 0)), (3, torch.device("cpu"))):
        alone = GpuTurns(tmp_path / f"t{peers}", peers=peers)
        alone.limit_memory(device)
        with alone.turn():
            pass
    assert calls == []


def test_compiled_runner_never_recompiles_for_inference_tensors_or_another_thread(tiny_models):
    """Live feeds windows made under inference_mode from a worker thread: no second compile."""
    import threading

    from torch._dynamo.utils import counters

    u, _ = _stages(tiny_models, get_engine("compile", backend="aot_eager"), torch.float32, [2])
    graphs = counters["stats"]["unique_graphs"]
    g = torch.Generator().manual_seed(3)
    lat, aud = torch.randn(2, 8, 32, 32, generator=g), torch.randn(2, 50, 384, generator=g)
    with torch.inference_mode():
        lat_inf, aud_inf = lat.clone(), aud.clone()
    outs, errors = [], []

    def call():
        try:
            outs.append(u.run(lat_inf, aud_inf))
        except Exception as exc:  # a recompile raises here
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    assert not errors, errors
    outs.append(u.run(lat, aud))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing was compiled again
    assert torch.equal(outs[0], outs[1])


class _TimedEvent:
    """Stand-in for ``torch.cuda.Event`` on the CPU host: a GPU that has finished the first
    ``done`` recorded events, each stage taking 2 ms."""

    done = 0
    recorded = 0

    def __init__(self, enable_timing: bool):
        self.n = None

    def record(self):
        self.n = _TimedEvent.recorded
        _TimedEvent.recorded += 1

    def query(self) -> bool:
        return self.n < _TimedEvent.done

    def synchronize(self):
        _TimedEvent.done = max(_TimedEvent.done, self.n + 1)

    def elapsed_time(self, end) -> float:
        return 2.0 * (end.n - self.n)


class _Graph:
    """Stands in for ``torch.cuda.CUDAGraph``; records each capture's stream priority and pool."""

    replays = 0
    captures: list[tuple[int, object]] = []  # (priority, pool) per capture

    def replay(self):
        _Graph.replays += 1

    def pool(self):
        return ("pool of", id(self))


def _stand_in_cuda_graphs(monkeypatch):
    """CUDA's stream and graph calls, stood in for so that a graph step runs on the CPU."""
    import contextlib

    class Stream:
        def __init__(self, *args, priority=0):
            self.priority = priority

        def wait_stream(self, other):
            pass

    def graph(g, pool=None, stream=None, **kw):
        _Graph.captures.append((stream.priority if stream is not None else 0, pool))
        return contextlib.nullcontext()

    _Graph.replays, _Graph.captures = 0, []
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)


def test_runner_recaptures_its_graphs_at_a_stream_priority(monkeypatch):
    """PyTorch's graphs keep their capture stream's priority, so a priority means a re-capture."""
    import gc
    import weakref

    from musetalk_rt.engines.base import EngineReport, Runner
    from musetalk_rt.engines.compile import _ManualGraphStep

    _stand_in_cuda_graphs(monkeypatch)
    calls = []

    def step(x):  # [B, 3]; each call's output tells the captures apart
        calls.append(x.shape[0])
        return x + len(calls)

    report = EngineReport("compile", "fp32", "cuda", [2, 4])
    fns = {b: _ManualGraphStep(step, [torch.zeros(b, 3)]) for b in (2, 4)}
    runner = Runner(fns, torch.float32, report)
    assert [c[0] for c in _Graph.captures] == [0, 0]
    first = fns[4].graph
    first_pool, first_alive = first.pool(), weakref.ref(first)
    del first
    calls.clear()

    assert runner.capture_priority(-1, batch=3) == 1  # the bucket that serves 3: 4
    assert calls == [4] and fns[4].priority == -1 and fns[2].priority == 0
    # captured high, into the old graph's pool, and the old graph is gone
    assert _Graph.captures[-1] == (-1, first_pool)
    gc.collect()
    assert first_alive() is None
    out = runner(torch.ones(3, 3))  # padded to bucket 4, replayed, sliced back
    assert _Graph.replays == 1 and torch.equal(out, torch.ones(3, 3))  # the re-capture's output

    assert runner.capture_priority(-1) == 2 and calls == [4, 2]  # bucket 4 is left as it was
    assert runner.capture_priority(0, batch=64) == 1 and fns[4].priority == 0  # the largest
    assert Runner({0: step}, torch.float32, report).capture_priority(-1) == 0  # no graph


def test_bench_times_each_priority_and_puts_the_graphs_back_even_on_error(monkeypatch):
    """Each variant re-captures its high stage's graph; all are at priority 0 afterwards."""
    from musetalk_rt import bench

    class Runner:  # records the priority its bucket's graph is at
        def __init__(self, graphs: bool):
            self.graphs, self.priority = graphs, 0

        def capture_priority(self, priority, batch=None):
            assert batch == 4
            if not self.graphs:
                return 0
            self.priority = priority
            return 1

    class Stage:
        def __init__(self, graphs=True):
            self.runner = Runner(graphs)

    unet, vae = Stage(), Stage()
    seen = []

    def timed(unet_, vae_, latents, audio, device, iters, priorities):
        seen.append((priorities, unet_.runner.priority, vae_.runner.priority))
        return 8.0, [15.0, 16.0], True

    monkeypatch.setattr(bench, "_time_overlapped", timed)
    latents, audio = torch.zeros(4, 8, 32, 32), torch.zeros(4, 50, 384)
    out = bench._time_priorities(unet, vae, latents, audio, torch.device("cpu"), 20)
    assert seen == [((-1, 0), -1, 0), ((0, -1), 0, -1)]
    assert out["unet_high"] == {"ms_per_batch": 8.0, "fps": 500.0, "p50_ms": 15.5, "exact": True}
    assert set(out) == {"unet_high", "vae_high"}
    assert unet.runner.priority == vae.runner.priority == 0

    # a stage without a graph of ours: its variant is left out, not timed at equal priorities
    seen.clear()
    out = bench._time_priorities(Stage(graphs=False), vae, latents, audio, None, 20)
    assert set(out) == {"vae_high"} and [s[0] for s in seen] == [(0, -1)]

    def fails(*args):
        raise RuntimeError("CUDA error")

    monkeypatch.setattr(bench, "_time_overlapped", fails)
    with pytest.raises(RuntimeError):
        bench._time_priorities(unet, vae, latents, audio, None, 20)
    assert unet.runner.priority == vae.runner.priority == 0


def test_manual_graph_step_holds_its_callable_for_as_long_as_it_lives(monkeypatch):
    """A captured graph replays the callable's kernels on the memory the callable owns.

    An AOTInductor package's weights are freed with its loader; the aoti engine kept only the
    step, so every replay read freed memory (the illegal memory access of --aoti-cuda-graphs on
    an H200). CUDA's stream and graph calls are stood in for here, so this runs on the CPU.
    """
    import gc
    import weakref

    from musetalk_rt.engines.compile import _ManualGraphStep

    _stand_in_cuda_graphs(monkeypatch)

    class Package:  # stands in for a loaded package: owns the weights the kernels read
        calls = 0

        def __call__(self, x):
            Package.calls += 1
            return x * 2

    package = Package()
    alive = weakref.ref(package)
    step = _ManualGraphStep(package, [torch.ones(2, 3)])
    assert Package.calls == 4  # three warm-up calls, then the captured one
    del package
    gc.collect()
    assert alive() is not None, "the step dropped the callable its graph replays"
    out = step(torch.zeros(2, 3))
    assert _Graph.replays == 1 and torch.equal(out, torch.full((2, 3), 2.0))
    del step
    gc.collect()
    assert alive() is None  # and no longer than the step


def test_stage_clock_stays_bounded_over_a_long_run_and_counts_every_stage(monkeypatch):
    """The live worker times every batch for hours: finished event pairs are folded as it
    goes, a reader that does not wait sees only finished work, a waiting one sees all of it."""
    from musetalk_rt.stages import StageClock

    monkeypatch.setattr(StageClock, "event", _TimedEvent)
    monkeypatch.setattr(_TimedEvent, "done", 0)
    monkeypatch.setattr(_TimedEvent, "recorded", 0)
    clock = StageClock(torch.device("cuda"), max_pending=8)  # no GPU is touched: events only
    for i in range(1000):
        with clock.stage("unet"):
            pass
        with clock.stage("to_host", on_host=True):
            pass
        if i % 10 == 0:  # the GPU catches up now and then
            _TimedEvent.done = _TimedEvent.recorded - 4
        assert clock.pending() <= 8  # never more than max_pending pairs kept
    before = clock.totals_ms(wait=False)["unet"]  # finished work only, no waiting
    assert before < 2000.0 and clock.pending() > 0
    assert clock.totals_ms()["unet"] == pytest.approx(1000 * 2.0)  # waits: all 1,000 stages
    assert clock.pending() == 0 and "to_host" in clock.totals_ms()


def test_autotune_stages_tune_only_the_named_stage(tiny_models):
    from musetalk_rt.cli import _engine_options, build_parser

    args = build_parser().parse_args(["bench", "--autotune-stages", "unet"])
    opts = _engine_options(args)
    assert opts == {"autotune_stages": "unet"}
    engine, _ = select_engine("compile", "cpu", torch.float32, backend="aot_eager", **opts)
    assert engine.cache_options()["autotune_stages"] == ["unet"]  # in the bench row
    ref_u, ref_v = _stages(tiny_models, get_engine("eager"), torch.float32, [2])
    u, v = _stages(tiny_models, engine, torch.float32, [2])
    assert engine.for_stage("unet").gemm_autotune
    assert not engine.for_stage("vae_decode").gemm_autotune
    assert "autotuning" not in u.runner.report.reason  # aot_eager: inductor's option only
    res = check_parity(ref_u.run, ref_v.run, u.run, v.run, 2, CPU)
    assert res.passed and res.latent_rel_err < 1e-4, res
    # each stage's cache key is the key of the engine it was built as: a UNet tuned this way
    # is the UNet of an engine with gemm_autotune, the VAE the plain one
    tuned = get_engine("compile", backend="aot_eager", gemm_autotune=True)
    plain = get_engine("compile", backend="aot_eager")
    fp = "synthetic-test"
    key_u, key_v = u.cache_key([2], fp), v.cache_key([2], fp)
    assert key_u == UNetStage(tiny_models.unet, tuned, torch.float32, CPU).cache_key([2], fp)
    assert key_u != UNetStage(tiny_models.unet, plain, torch.float32, CPU).cache_key([2], fp)
    assert key_v == VaeDecodeStage(tiny_models.vae, plain, torch.float32, CPU).cache_key([2], fp)
    assert engine.autotune_stages == ("unet",)  # the caller's engine is not changed


def test_gemm_autotune_keeps_the_mode_and_adds_no_coordinate_descent():
    from musetalk_rt.engines.compile import mode_options

    # torch.compile takes a mode or options: the mode's own options stay, the GEMM tuning is
    # added, and nothing turns coordinate descent on (mode max-autotune would)
    assert mode_options("reduce-overhead", max_autotune_gemm=True) == {
        "triton.cudagraphs": True,
        "max_autotune_gemm": True,
    }
    opts = mode_options(None, max_autotune_gemm=True)
    assert opts == {"max_autotune_gemm": True}
    assert "coordinate_descent_tuning" not in opts
    torch.compile(torch.nn.Identity(), options=opts)  # inductor knows every option
    with pytest.raises(UserError, match="unknown compile mode 'fast'; choose one of"):
        mode_options("fast", max_autotune_gemm=True)


def test_readme_table_keeps_autotuned_rows_apart():
    from musetalk_rt.workbench.report import config_label, perf_table

    plain = {"freezing": True, "phase_upsample": True}
    row = {"engine": "compile", "dtype": "fp16", "engine_options": plain, "batch": 4}
    row |= {"gpu": "NVIDIA H200", "driver": "580", "quality": {"psnr_db": 57.8}}
    tuned = dict(row, engine_options=plain | {"autotune_stages": ["unet"]}, fps=399.7, time="1")
    assert config_label(tuned) == "compile fp16 (freezing, phase-upsample, autotune-stages=unet)"
    both = {"autotune_stages": ["unet", "vae_decode"], "gemm_autotune": True}
    assert config_label(dict(row, engine_options=both)).endswith(
        "(autotune-stages=unet+vae_decode, gemm-autotune)"
    )
    aoti = {"engine": "aoti", "dtype": "fp16", "engine_options": {"max_autotune": True}}
    aoti |= {"engine_reason": "AOTInductor packages (1 loaded), CUDA graphs (manual capture)"}
    assert config_label(aoti) == "aoti fp16 (max-autotune)"
    # aoti is contiguous unless asked: its channels-last rows get a line of their own
    fast = {"freezing": True, "channels_last": True, "weights": "blob"}
    assert config_label(dict(aoti, engine_options=fast)) == "aoti fp16 (freezing, channels-last)"
    # graphs are aoti's default since 2026-12-04: rows without them get a line of their own,
    # recorded in the options or (earlier rows) read from the engine's report
    nograph = dict(aoti, engine_reason="AOTInductor packages (1 loaded from the engine cache)")
    assert config_label(nograph) == "aoti fp16 (max-autotune, no cuda-graphs)"
    recorded = dict(aoti, engine_options={"cuda_graphs": False}, engine_reason="")
    assert config_label(recorded) == "aoti fp16 (no cuda-graphs)"
    # a newer untuned row does not hide the tuned one: two lines
    table = perf_table([tuned, dict(row, fps=438.2, time="2")])
    assert "| 399.7 |" in table and "| 438.2 |" in table


def test_autotune_stages_per_stage_for_aoti():
    engine = get_engine("aoti", autotune_stages="vae_decode, vae_decode")
    assert engine.autotune_stages == ("vae_decode",)
    assert engine.for_stage("vae_decode").max_autotune
    assert not engine.for_stage("unet").max_autotune
    assert engine.for_stage("unet").cache_options() == get_engine("aoti").cache_options()
    assert get_engine("aoti").for_stage("unet").max_autotune is False


def test_autotuned_aoti_stages_load_their_own_cached_files(tmp_path):
    """Each stage's engine keeps its own cached files: with a warm cache the VAE stage must
    not find the UNet's package of the same bucket (a shallow copy shared the dict)."""
    engine = get_engine("aoti", autotune_stages="vae_decode")
    unet, vae = engine.for_stage("unet"), engine.for_stage("vae_decode")
    for stage in ("unet", "vae"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "b4.pt2").write_bytes(b"package")
    assert unet.load_cache(tmp_path / "unet") and vae.load_cache(tmp_path / "vae")
    assert unet._cached == {4: tmp_path / "unet" / "b4.pt2"}
    assert vae._cached == {4: tmp_path / "vae" / "b4.pt2"}


@pytest.mark.parametrize(
    ("name", "opts", "message"),
    [
        ("compile", {"autotune_stages": "unet,vae"}, "unknown stage 'vae'; choose from unet"),
        ("compile", {"autotune_stages": "unet", "mode": "max-autotune"}, "drop --compile-mode"),
        ("aoti", {"autotune_stages": "unet", "max_autotune": True}, "drop --aoti-max-autotune"),
        ("eager", {"autotune_stages": "unet"}, "does not take the options autotune_stages"),
    ],
)
def test_autotune_stages_bad_input_says_what_to_do(name, opts, message):
    with pytest.raises(UserError, match=message):
        get_engine(name, **opts)


def test_bench_refuses_autotune_stages_with_fused_stages(tiny_models):
    from musetalk_rt.bench import run_bench

    with pytest.raises(UserError, match="--fuse-stages builds UNet and VAE decode as one"):
        run_bench(
            tiny_models,
            ["compile"],
            ["fp32"],
            [2],
            warmup=1,
            iters=1,
            engine_options={"compile": {"backend": "aot_eager", "autotune_stages": "unet"}},
            log=lambda line: None,
            fuse_stages=True,
        )


def test_sm_clock_reads_nvml_then_nvidia_smi_else_none(monkeypatch):
    """The bench's clock sample: NVML through torch, else ``nvidia-smi`` (the card the device
    index names among the visible ones), else None — never an error in a row."""
    import subprocess
    from types import SimpleNamespace

    from musetalk_rt import bench

    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1980)
    assert bench._sm_clock_mhz(cuda1) == 1980

    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed")

    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench._sm_clock_mhz(cuda1) is None  # neither NVML nor the tool
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert bench.environment(cuda1)["driver"] == "unknown"  # the rows' driver: the same query

    calls = []

    def smi(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(stdout="1755\n", returncode=0)

    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(bench.subprocess, "run", smi)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert bench._sm_clock_mhz(cuda1) == 1755
    assert calls[-1][-2:] == ["-i", "6"]  # the host's card behind visible device 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5e1f")  # UUIDs: the index as given
    assert bench._sm_clock_mhz(cuda1) == 1755 and calls[-1][-1] == "1"
    assert bench.environment(cuda1)["driver"] == "1755"  # the same query, its one field
    (query,) = [c for c in calls if "--query-gpu=driver_version" in c]
    assert query[-2:] == ["-i", "1"]
    monkeypatch.setattr(torch.cuda, "clock_rate", lambda device=None: 1980)
    assert bench._sm_clock_mhz(cuda1, maximum=True) == 1755  # the tool, not NVML's clock now
    assert "--query-gpu=clocks.max.sm" in calls[-1]
    monkeypatch.setattr(torch.cuda, "clock_rate", no_nvml)

    def fails(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, 5)

    monkeypatch.setattr(bench.subprocess, "run", fails)
    assert bench._sm_clock_mhz(cuda1) is None
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: SimpleNamespace(stdout="[N/A]"))
    assert bench._sm_clock_mhz(cuda1) is None


def test_card_load_tells_a_power_limit_from_a_heat_one(monkeypatch):
    """Power draw and the clock's limits while a queue runs: NVML, else ``nvidia-smi``, else
    nothing — never an error in a row."""
    import sys
    from types import SimpleNamespace

    from musetalk_rt import bench

    cuda1 = torch.device("cuda", 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    handles = []
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: handles.append(i) or f"h{i}",
        nvmlDeviceGetPowerUsage=lambda h: 687_512,  # mW
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4,
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert bench._load_state(cuda1) == {"power_w": 687.5, "clock_limits": ["sw_power_cap"]}
    assert handles == [6]  # NVML counts the host's cards, as nvidia-smi does

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the tool
    calls = []

    def smi(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(stdout="412.30, 0x0000000000000060\n")

    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(bench.subprocess, "run", smi)
    state = bench._load_state(cuda1)
    assert state == {
        "power_w": 412.3,
        "clock_limits": ["sw_thermal_slowdown", "hw_thermal_slowdown"],
    }
    assert "--query-gpu=power.draw,clocks_event_reasons.active" in calls[-1]
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: SimpleNamespace(stdout="0\n"))
    assert bench._load_state(cuda1) == {}  # a field short: nothing, not a guess
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench._load_state(cuda1) == {}
