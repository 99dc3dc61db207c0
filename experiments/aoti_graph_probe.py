"""Why does a CUDA graph around an AOTInductor package fail? Bisected in fresh processes.

On an H200 (torch 2.11, experiments/LOG.md 2026-12-01) the batch-4 UNet and VAE-decoder packages
loaded and ran, but a ``torch.cuda.CUDAGraph`` captured around their call failed: with the
package's default runner "operation not permitted when stream is capturing", with
``run_single_threaded`` an illegal memory access. So ``aoti`` ran without graphs, and at small
batches the host's launches set its pace (B4: 202-280 fps against ~450 for ``compile`` with a
captured graph). The cause, found with this probe on 2026-12-04: the engine's capture step did
not hold the package, whose weights were freed with its loader (variant ``graph_freed``); the
step holds it now and ``aoti`` captures by default. This probe finds where a capture breaks, on:

* small modules, one kind of operation each (``conv``, ``gn``, ``attn``, ``linear``, ``up``)
  and all of them together (``mix``), to tell a kind of kernel apart from the runtime;
* the real stages (``vae_decode``, ``unet``) with full-size synthetic weights.

Each target is compiled to a package the way the engine compiles (fp16, the engine's C++
compiler choice and weights layout), then every variant runs in a fresh process (an illegal
address poisons the CUDA context) and reports the phase it reached:

* ``nograph`` — the package called directly (the engine's default until 2026-12-04);
* ``graph_cold`` — the engine's capture as the package's very first calls (the engine
  captures right after loading; every other variant calls the package directly first);
* ``graph`` — the engine's own capture (:class:`~musetalk_rt.engines.compile._ManualGraphStep`:
  warm-up on a side stream, capture on a fresh one);
* ``graph_same_stream`` — warm-up and capture on one stream;
* ``graph_relaxed`` — capture with ``capture_error_mode="relaxed"``;
* ``graph_threaded`` — the default (multi-threaded) runner under the engine's capture;
* ``graph_nograd`` — ``graph`` under ``torch.no_grad()`` instead of ``torch.inference_mode()``;
* ``graph_freed`` — the capture, then the package's loader dropped before the replays (as the
  engine's build loop did until the capture step held it: the cause, found on 2026-12-04);
* ``engine`` — the engine's own build loop with graphs, loading the package from a cache folder
  (``b<B>.pt2``, as the engine cache names it); ``engine_models`` — the same after loading the
  full-size synthetic models onto the GPU and importing the command line, as ``bench`` does.
  ``engine_build`` compiles the package in the same process first, as ``engines build`` does.
  With an ``A+B`` target both stages go through it in one process, as in ``bench``.

A graph variant passes when two replays on two inputs equal the direct calls on the same
inputs (max abs difference). With ``--sanitize TARGETS`` the ``graph`` variant of those targets
also runs under ``compute-sanitizer`` (when the host has it) and its first reports are kept.
Afterwards the passing graph variants of the real stages are timed one process at a time.

    python experiments/aoti_graph_probe.py --device cuda --out OUT [--targets conv,gn,vae_decode]

One JSONL row per (target, variant) into ``<out>/aoti_graph_probe.jsonl``, a table, and one
JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

CUDA = torch.device("cuda")
TOYS = ("conv", "gn", "attn", "linear", "up", "mix")
STAGES = ("vae_decode", "unet")
VARIANTS = (
    "nograph",
    "graph_cold",
    "graph",
    "graph_same_stream",
    "graph_relaxed",
    "graph_threaded",
    "graph_nograd",
    "graph_freed",
    "engine",
    "engine_models",
    "engine_build",
)


class Toy(nn.Module):
    """One kind of operation (or all of them) at a decoder-like size: ``[B, 64, 32, 32]``."""

    def __init__(self, kind: str, ch: int = 64):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        self.ff = nn.Linear(ch, 4 * ch)
        self.ff2 = nn.Linear(4 * ch, ch)
        self.up = nn.Conv2d(ch, ch, 3, padding=1)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(t).view(b, h * w, 3, 4, c // 4).permute(2, 0, 3, 1, 4)  # [B, 4, HW, C/4]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.proj(a).transpose(1, 2).reshape(b, c, h, w)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        t = t + self.ff2(F.gelu(self.ff(t)))
        return t.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 64, 32, 32]
        k = self.kind
        if k in ("conv", "mix"):
            x = F.silu(self.conv(x))
        if k in ("gn", "mix"):
            x = F.silu(self.norm(x))
        if k in ("attn", "mix"):
            x = self._attn(x)
        if k in ("linear", "mix"):
            x = self._linear(x)
        if k in ("up", "mix"):
            x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [B, 64, 64, 64]
        return x


def _dtype(device: str) -> torch.dtype:
    return torch.float16 if device == "cuda" else torch.float32  # (CPU: a smoke test only)


def _module_and_inputs(target: str, batch: int, device: str):
    """The target's fp32 module (CPU) and two input sets (fp16 on CUDA, on the device)."""
    g = torch.Generator().manual_seed(batch)
    if target in TOYS:
        torch.manual_seed(0)
        mod = Toy(target)
        shapes = [(batch, 64, 32, 32)]
    else:
        from musetalk_rt.modeling import UNetStep, VaeDecodeStep
        from musetalk_rt.weights import load_models

        models = load_models("synthetic", device="cpu")
        if target == "unet":
            mod, shapes = UNetStep(models.unet), [(batch, 8, 32, 32), (batch, 50, 384)]
        else:
            mod, shapes = VaeDecodeStep(models.vae), [(batch, 4, 32, 32)]
    sets = [
        [torch.randn(s, generator=g).to(device=device, dtype=_dtype(device)) for s in shapes]
        for _ in range(2)
    ]
    return mod, sets


def build(target: str, batch: int, device: str, folder: Path) -> None:
    """Compile ``target`` to ``folder/<target>.pt2`` as the aoti engine does; save its inputs."""
    from safetensors.torch import save_file

    from musetalk_rt.engines.aoti import AotiEngine, export_bucket, prepare_module

    mod, sets = _module_and_inputs(target, batch, device)
    t0 = time.perf_counter()
    m = prepare_module(mod, _dtype(device), torch.device(device))
    eng = AotiEngine()
    with torch.inference_mode():
        path = eng._compile(export_bucket(m, tuple(sets[0])), tuple(sets[0]), folder / "tmp.pt2")
    shutil.move(str(path), folder / f"{target}.pt2")
    tensors = {
        f"s{i}_{j}": x.cpu().contiguous() for i, xs in enumerate(sets) for j, x in enumerate(xs)
    }
    save_file(tensors, str(folder / f"{target}_inputs.safetensors"))
    print(f"BUILT {target} {time.perf_counter() - t0:.1f} s ({eng.compiler_note})", flush=True)


def _load_inputs(folder: Path, target: str) -> list[list[torch.Tensor]]:
    """The two input sets ``build`` saved for ``target`` (CPU tensors)."""
    from safetensors.torch import load_file

    raw = load_file(str(folder / f"{target}_inputs.safetensors"))
    n = len({k.split("_")[1] for k in raw})
    return [[raw[f"s{i}_{j}"] for j in range(n)] for i in range(2)]


def _first(y):
    return y[0] if isinstance(y, (list, tuple)) else y


def _sync_phase(phase: str) -> None:
    torch.cuda.synchronize()
    print(f"PHASE {phase} ok", flush=True)


def _replay_and_compare(row: dict, steps, sets, refs) -> dict:
    """Call each step on its inputs, compare with its direct-call output, finish ``row``."""
    row["phase"] = "replay"
    diffs = []
    for step, xs, ref in zip(steps, sets, refs, strict=True):
        y = _first(step(*xs))
        torch.cuda.synchronize()
        diffs.append((y.float() - ref.float()).abs().max().item())
    _sync_phase("replay")
    row["max_abs_diff"] = max(diffs)
    row["phase"] = "done"
    row["passed"] = row["max_abs_diff"] < 1e-3  # a replay runs the same kernels: 0 expected
    return row


def run_pair(targets: list[str], variant: str, folder: Path) -> dict:
    """Two packages in one process, as the engine holds the UNet's and the VAE's.

    Each is called directly, then (graph variants) captured with the engine's capture, then both
    are replayed and compared with the direct calls.
    """
    from musetalk_rt.engines.aoti import load_package
    from musetalk_rt.engines.compile import _ManualGraphStep

    row: dict = {"target": "+".join(targets), "variant": variant, "phase": "load"}
    fns, sets = [], []
    for t in targets:
        sets.append([x.cuda() for x in _load_inputs(folder, t)[0]])
        fns.append(load_package(folder / f"{t}.pt2", run_single_threaded=True))
    with torch.inference_mode():
        row["phase"] = "direct"
        refs = [_first(fn(*xs)).clone() for fn, xs in zip(fns, sets, strict=True)]
        _sync_phase("direct")
        steps = fns
        if variant != "nograph":
            row["phase"] = "capture"
            steps = []
            for i, (fn, xs) in enumerate(zip(fns, sets, strict=True)):
                steps.append(_ManualGraphStep(fn, xs))
                _sync_phase(f"capture {targets[i]}")
        return _replay_and_compare(row, steps, sets, refs)


def run_engine(targets: list[str], variant: str, folder: Path) -> dict:
    """The engine's own build loop with graphs, against the direct calls.

    :class:`~musetalk_rt.engines.aoti.AotiEngine` with ``cuda_graphs=True`` loads each target
    from a cache folder whose package is ``b<B>.pt2``, as the engine cache names them.

    ``engine``: in this bare process; ``engine_models``: after loading the full-size synthetic
    models onto the GPU and importing the command line, as ``bench`` and ``engines build`` do;
    ``engine_build``: the package compiled in this process first, as ``engines build`` does.
    Bisects between the probe's capture (which works) and the engine's (which did not).
    """
    from musetalk_rt.engines.aoti import AotiEngine, load_package

    row: dict = {"target": "+".join(targets), "variant": variant, "phase": "setup"}
    if variant == "engine_models":
        import musetalk_rt.cli  # noqa: F401 - every import the command line makes
        from musetalk_rt.weights import load_models

        models = load_models("synthetic", device="cuda")  # held to the end, as the CLI does
        row["models_on_gpu"] = models.device.type == "cuda"
    cases = []
    for t in targets:
        xs = _load_inputs(folder, t)[0]  # CPU, as a stage's example_inputs gives them
        batch = xs[0].shape[0]
        cache = folder / f"cache_{t}"
        cache.mkdir(exist_ok=True)
        if not (cache / f"b{batch}.pt2").exists():
            shutil.copy(folder / f"{t}.pt2", cache / f"b{batch}.pt2")
        direct = load_package(folder / f"{t}.pt2")
        with torch.inference_mode():
            ref = _first(direct(*[x.cuda() for x in xs])).clone()
        del direct
        cases.append((t, xs, batch, cache, ref))
    _sync_phase("direct")
    row["phase"] = "build"
    runners = []
    for t, xs, batch, cache, _ in cases:
        eng = AotiEngine(cuda_graphs=True)
        module = None
        if variant == "engine_build":  # built in this process, as `engines build` does
            module, _ = _module_and_inputs(t, batch, "cuda")
        else:
            assert eng.load_cache(cache)
        runners.append(eng.build(module, lambda b, xs=xs: tuple(xs), [batch], torch.float16, CUDA))
        _sync_phase(f"build {t}")
    with torch.inference_mode():
        sets = [[x.cuda() for x in c[1]] for c in cases]
        return _replay_and_compare(row, runners, sets, [c[4] for c in cases])


def run(target: str, variant: str, folder: Path, iters: int) -> dict:
    """One variant in this (fresh) process; returns its result row."""
    from musetalk_rt.engines.aoti import load_package
    from musetalk_rt.engines.compile import _ManualGraphStep

    sets = [[x.cuda() for x in xs] for xs in _load_inputs(folder, target)]
    row: dict = {"target": target, "variant": variant, "phase": "load"}
    t0 = time.perf_counter()
    fn = load_package(folder / f"{target}.pt2", run_single_threaded=variant != "graph_threaded")
    row["load_s"] = round(time.perf_counter() - t0, 2)
    with torch.no_grad() if variant == "graph_nograd" else torch.inference_mode():
        row["phase"] = "direct"
        cold = variant == "graph_cold"
        refs = [] if cold else [_first(fn(*xs)).clone() for xs in sets]  # [B, ...] direct calls
        _sync_phase("direct")
        if variant == "nograph":
            step = fn
        else:
            row["phase"] = "capture"
            static = [x.clone() for x in sets[0]]
            if variant in ("graph", "graph_cold", "graph_threaded", "graph_nograd"):
                step = _ManualGraphStep(fn, sets[0])
            else:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        fn(*static)
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()  # (graph_same_stream, graph_relaxed, graph_freed)
                kw = {"stream": s} if variant == "graph_same_stream" else {}
                if variant == "graph_relaxed":
                    kw["capture_error_mode"] = "relaxed"
                with torch.cuda.graph(graph, **kw):
                    out = _first(fn(*static))

                def step(*xs, graph=graph, static=static, out=out):
                    for d, x in zip(static, xs, strict=True):
                        d.copy_(x)
                    graph.replay()
                    return out.clone()

            _sync_phase("capture")
            if variant == "graph_freed":  # only the graph left: the package's memory is freed
                del fn
                gc.collect()
        row["phase"] = "replay"
        ys = []
        for xs in sets:
            ys.append(_first(step(*xs)).clone())
            torch.cuda.synchronize()
        if cold:  # the direct calls after the graph's
            refs = [_first(fn(*xs)).clone() for xs in sets]
        diffs = [(y.float() - r.float()).abs().max().item() for y, r in zip(ys, refs, strict=True)]
        _sync_phase("replay")
        row["max_abs_diff"] = max(diffs)
        row["phase"] = "done"
        if iters:
            ms = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                step(*sets[0])
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b))
            row["p50_ms"] = round(statistics.median(ms), 3)
    row["passed"] = row["max_abs_diff"] < 1e-3  # a replay runs the same kernels: 0 expected
    return row


def _child(args: list[str], env: dict | None, timeout_s: float, prefix: list[str] | None = None):
    cmd = (prefix or []) + [sys.executable, __file__, *args]
    try:
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        rc = "timeout"
    return rc, text


def _row_from(target: str, variant: str, rc, text: str) -> dict:
    lines = text.strip().splitlines()
    for ln in reversed(lines):
        if ln.startswith("RESULT "):
            row = json.loads(ln[7:])
            break
    else:
        phases = [ln.split()[1] for ln in lines if ln.startswith("PHASE ")]
        row = {
            "target": target,
            "variant": variant,
            "phase": "after " + (phases[-1] if phases else "start"),
            "passed": False,
        }
    row["returncode"] = rc
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    if not row.get("passed"):
        row["error"] = errs[-1][:300] if errs else (lines[-1][:300] if lines else "")
        row["tail"] = lines[-12:]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    b = sub.add_parser("build")
    b.add_argument("target")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--dir", type=Path, required=True)
    b.add_argument("--device", default="cuda")
    r = sub.add_parser("run")
    r.add_argument("target", help="a target, or A+B: both in one process")
    r.add_argument("variant", choices=VARIANTS)
    r.add_argument("--dir", type=Path, required=True)
    r.add_argument("--iters", type=int, default=0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--targets", default=",".join(TOYS + STAGES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--pairs", default="unet+vae_decode", help="A+B: two packages in one process (graph)"
    )
    ap.add_argument("--sanitize", default="conv", help="targets whose graph runs sanitized")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--build-timeout-s", type=float, default=300)
    ap.add_argument("--iters", type=int, default=50, help="timed calls per passing stage row")
    ap.add_argument("--time-limit-s", type=float, default=540, help="no sanitizer or timing after")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.target, args.batch, args.device, args.dir)
        return 0
    if args.cmd == "run":
        try:
            if args.variant.startswith("engine"):  # the engine's build loop, per target
                row = run_engine(args.target.split("+"), args.variant, args.dir)
            elif "+" in args.target:  # two packages in one process
                row = run_pair(args.target.split("+"), args.variant, args.dir)
            else:
                row = run(args.target, args.variant, args.dir, args.iters)
        except Exception as e:  # noqa: BLE001 - the row says what failed and where
            row = {
                "target": args.target,
                "variant": args.variant,
                "passed": False,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:240]}",
            }
            print(f"FAILED {row['error']}", flush=True)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    if not torch.cuda.is_available():
        print("aoti_graph_probe: needs a CUDA GPU", file=sys.stderr)
        return 2
    targets = [t for t in args.targets.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="aoti-graph-"))
    card = torch.cuda.get_device_name()
    common = {"card": card, "torch": torch.__version__, "dtype": "fp16", "batch": args.batch}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(targets)) as pool:  # every build at once
        builds = dict(
            zip(
                targets,
                pool.map(
                    lambda t: _child(
                        ["build", t, "--batch", str(args.batch), "--dir", str(work)],
                        None,
                        args.build_timeout_s,
                    ),
                    targets,
                ),
                strict=True,
            )
        )
    built = [t for t in targets if (work / f"{t}.pt2").is_file()]
    for pair in [p for p in args.pairs.split(",") if p]:  # two packages in one process
        if all(t in built for t in pair.split("+")):
            built.append(pair)
    for t, (rc, text) in builds.items():
        line = next((ln for ln in text.splitlines() if ln.startswith("BUILT")), None)
        print(line or f"BUILD FAILED {t} rc={rc}: {text.strip().splitlines()[-3:]}", flush=True)
    print(f"builds: {time.perf_counter() - t0:.0f} s", flush=True)

    def check(t: str) -> list[dict]:
        rows = []
        for v in variants:
            limit_s = 420 if v == "engine_build" else 180  # (that one compiles, minutes)
            rc, text = _child(["run", t, v, "--dir", str(work)], None, limit_s)
            rows.append(_row_from(t, v, rc, text))
        return rows

    rows: list[dict] = []
    with ThreadPoolExecutor(max(1, len(built))) as pool:  # targets at once, variants in turn
        for rs in pool.map(check, built):
            rows += rs
    san = shutil.which("compute-sanitizer") or next(
        (str(p) for p in Path("/usr/local").glob("cuda*/bin/compute-sanitizer")), None
    )
    for t in [t for t in args.sanitize.split(",") if t in built]:
        if time.perf_counter() - t0 > args.time_limit_s - 120:
            break
        if san is None:
            rows.append({"target": t, "variant": "graph_sanitized", "error": "no sanitizer"})
            break
        rc, text = _child(
            ["run", t, "graph", "--dir", str(work)],
            None,
            300,
            prefix=[san, "--tool", "memcheck", "--print-limit", "4"],
        )
        row = _row_from(t, "graph_sanitized", rc, text)
        row["sanitizer"] = [ln for ln in text.splitlines() if ln.startswith("=========")][:40]
        rows.append(row)
    for row in [r for r in rows if r["target"] in STAGES and r.get("passed")]:  # timed, alone
        if time.perf_counter() - t0 > args.time_limit_s - 20:
            break
        rc, text = _child(
            ["run", row["target"], row["variant"], "--dir", str(work), "--iters", str(args.iters)],
            None,
            180,
        )
        timed = _row_from(row["target"], row["variant"], rc, text)
        row["p50_ms"] = timed.get("p50_ms")
    for row in rows:
        row.update(common)
    from musetalk_rt.bench import write_rows

    write_rows(rows, args.out, "aoti_graph_probe.jsonl")
    print(
        f"{'target':11} {'variant':18} {'passed':6} {'phase':15} {'diff':>9} {'p50 ms':>7}  error"
    )
    for r in rows:
        print(
            f"{r['target']:11} {r['variant']:18} {str(r.get('passed')):6} "
            f"{str(r.get('phase')):15} {r.get('max_abs_diff', ''):>9} "
            f"{str(r.get('p50_ms', '')):>7}  {r.get('error', '')[:90]}"
        )
    summary = {
        "aoti_graph_probe": str(args.out / "aoti_graph_probe.jsonl"),
        "card": card,
        "passed": sorted({f"{r['target']}:{r['variant']}" for r in rows if r.get("passed")}),
        "failed": sorted({f"{r['target']}:{r['variant']}" for r in rows if not r.get("passed")}),
    }
    print(json.dumps(summary))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
