"""Does inductor's programmatic dependent launch (PDL) reach the GPU here, and what is it worth?

The 2026-12-05 bench rows with ``--inductor-config triton.enable_pdl=true`` came out level with
the rows without. This probe says whether that was PDL doing nothing or PDL not being on: it
compiles a chain of small Triton-only layers (group norm + SiLU + a residual add, the pattern
between the UNet's convolutions at batch 4) with and without ``triton.enable_pdl``, counts the
PDL instructions in the generated kernels, and times each compiled chain replayed in a CUDA
graph, as the engines run it. Ends with one JSON line.

Usage: ``python experiments/pdl_probe.py [--layers 24] [--iters 200]`` (CUDA; on a CPU it runs
the same steps, where inductor emits no PDL).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _chain(layers: int, channels: int):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(32, channels)

        def forward(self, x):  # [B, C, H, W] -> same
            return x + torch.nn.functional.silu(self.norm(x))

    return nn.Sequential(*[Block() for _ in range(layers)])


def _run(pdl: bool, args, cache_dir: Path) -> dict:
    import torch
    import torch._dynamo

    torch._dynamo.reset()
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = _chain(args.layers, args.channels).to(dev, dtype).eval()
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=dev, dtype=dtype)
    compiled = torch.compile(model, options={"triton.enable_pdl": pdl}, fullgraph=True)
    before = {p: p.stat().st_mtime for p in cache_dir.rglob("*.py")}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = compiled(x)
        build_s = time.perf_counter() - t0
        sources = [p for p in cache_dir.rglob("*.py") if before.get(p) != p.stat().st_mtime]
        text = "\n".join(p.read_text(errors="replace") for p in sources)
        row = {
            "pdl": pdl,
            "build_s": round(build_s, 2),
            "gdc_wait": text.count("gdc_wait"),
            "gdc_launch_dependents": text.count("gdc_launch_dependents"),
            "launch_pdl_true": text.count("'launch_pdl': True"),
            "max_abs_diff_vs_eager": float((out - model(x)).abs().max()),
        }
        if dev.type != "cuda":
            return row
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                compiled(x)
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            compiled(x)
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        row["graph_us_per_call"] = round(start.elapsed_time(end) * 1000 / args.iters, 1)
        row["kernels_hint"] = args.layers * 2  # stats + apply per norm, roughly
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp  # this probe's kernels only
        rows = [_run(pdl, args, Path(tmp)) for pdl in (False, True)]
    for r in rows:
        print(r, flush=True)
    base, pdl = rows
    summary = {"pdl_probe": rows, "device": args.device, "layers": args.layers}
    if "graph_us_per_call" in base:
        summary["pdl_saving_us_per_call"] = round(
            base["graph_us_per_call"] - pdl["graph_us_per_call"], 1
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
