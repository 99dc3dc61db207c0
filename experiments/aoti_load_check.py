"""Does an AOTInductor package load on this GPU host at all? The smallest case, in fresh processes.

The UNet's aoti package segfaulted in ``aoti_load_package`` on an H100 and an H200 (torch 2.11;
experiments/LOG.md). This check tells the host and torch build apart from our modules: a
two-layer convolution network is exported, compiled to a package per weights layout (``so``:
weights inside the shared object, ``blob``: beside it) and loaded and called in a **fresh
process** each, compared with eager. One JSONL row per layout into ``<out>/aoti_load_check.jsonl``
with the child's exit code (-11 = segfault) and the last lines of its output.

    python experiments/aoti_load_check.py --device cuda --out OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from musetalk_rt.bench import write_rows

CHILD = """
import sys, time, torch, torch._inductor
t = time.perf_counter()
fn = torch._inductor.aoti_load_package(sys.argv[1])
load_s = time.perf_counter() - t
x = torch.load(sys.argv[2], weights_only=True)
with torch.inference_mode():
    y = fn(x["input"].to(sys.argv[3]))
y = y[0] if isinstance(y, (list, tuple)) else y
err = ((y.float().cpu() - x["expect"]).norm() / x["expect"].norm()).item()
print(f"LOADED load_s={load_s:.2f} rel_err={err:.2e}")
"""


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x):  # [B, 4, 32, 32]
        return self.c2(torch.nn.functional.silu(self.c1(x)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--layouts", default="so,blob", help="weights layouts to try")
    ap.add_argument("--label", default="", help="a tag for the rows (e.g. the compiler flags)")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="aoti-check-"))
    m = Tiny().to(args.device, dtype).eval()
    x = torch.randn(4, 4, 32, 32, device=args.device, dtype=dtype)
    with torch.inference_mode():
        expect = m(x).float().cpu()
    torch.save({"input": x.cpu(), "expect": expect}, work / "io.pt")
    with torch.inference_mode():
        ep = torch.export.export(m, (x,), strict=False)
    rows = []
    layouts = {
        "so": {},
        "blob": {
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob",
        },
    }
    for layout in args.layouts.split(","):
        configs = layouts[layout]
        t = time.perf_counter()
        pkg = torch._inductor.aoti_compile_and_package(
            ep, package_path=str(work / f"{layout}.pt2"), inductor_configs=configs
        )
        build_s = time.perf_counter() - t
        child = subprocess.run(
            [sys.executable, "-c", CHILD, pkg, str(work / "io.pt"), args.device],
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = (child.stdout + child.stderr).strip().splitlines()
        rows.append(
            {
                "check": "aoti_load",
                "module": "two-conv net",
                "weights_layout": layout,
                "label": args.label,
                "cxx": os.environ.get("CXX", "g++"),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "dtype": args.dtype,
                "torch": torch.__version__,
                "build_s": round(build_s, 1),
                "package_bytes": Path(pkg).stat().st_size,
                "returncode": child.returncode,
                "result": next((ln for ln in out if ln.startswith("LOADED")), None),
                "tail": out[-30:],
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}), flush=True)
        if child.returncode:
            print("\n".join(out[-30:]), flush=True)
    write_rows(rows, args.out, "aoti_load_check.jsonl")
    ok = [r["weights_layout"] for r in rows if r["returncode"] == 0]
    print(json.dumps({"aoti_load_check": str(args.out), "loaded": ok}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
