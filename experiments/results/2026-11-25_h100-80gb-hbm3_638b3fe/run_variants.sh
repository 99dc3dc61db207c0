#!/bin/bash
# Seven compile-engine variants at B=4 fp16 built concurrently on one H100; each times alone
# (bench --gpu-turns) once all have built. Usage: run_variants.sh OUTDIR
# Run on an H100 at 638b3fe (rows in bench.jsonl beside this file).
OUT=$1
export TORCHINDUCTOR_COMPILE_THREADS=4
python3 -c "import torch, torch._inductor.config as c; print('torch', torch.__version__, 'fp16_reduced_reduction', torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction, 'epilogue_fusion', c.epilogue_fusion, 'conv_1x1_as_mm(default)', c.conv_1x1_as_mm)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
rm -rf /tmp/turns
N=7
run() {
  name=$1; shift
  timeout 450 python3 -m musetalk_rt bench --weights synthetic --engine compile --dtype fp16 \
    --batch-sizes 4 --iters 100 --out "$OUT/rows" --gpu-turns /tmp/turns --gpu-peers $N \
    --gpu-peers-deadline-s 330 --compile-freezing "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)"
}
date +%T
run base &
run fuse --fuse-stages &
run cudnn --compile-cudnn-benchmark &
run manual --compile-graph-capture manual &
run qkv --compile-fuse-qkv &
run combo --fuse-stages --compile-cudnn-benchmark --compile-fuse-qkv &
run combo_manual --fuse-stages --compile-cudnn-benchmark --compile-graph-capture manual &
wait
for f in "$OUT"/*.log; do echo "== $f"; grep -E "fps|error|Error|gpu turns|rc=" "$f" | tail -4; done
python3 - "$OUT/rows/bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    o = r["engine_options"]
    tag = ",".join(k for k in ("fuse_qkv", "cudnn_benchmark") if o[k]) + f",{o['graph_capture']}"
    print(r["stages"][-7:], tag, r["fps"], r["p50_ms"], r["gpu_p50_ms"], r["gpu_fps"],
          r["unet_p50_ms"], r["vae_decode_p50_ms"], r["build_s"], r["quality"]["psnr_db"],
          r["peak_mem_mb"], r["gpu_turns"])
PY
