#!/usr/bin/env bash
# The open GPU runs of the live (many channels) and engines (aoti, the bench rows) work, in
# stages that each fit one 10-minute GPU run. Rows go to $OUT/res, logs to $OUT/logs_<stage>.tgz.
#
#   experiments/gpu_runs.sh channels [N]  # audio path with outputs in processes (16 channels),
#                                      # then the 5-minute live probe at N channels (default 12:
#                                      # 16 talking channels need ~400 fps + their canvases, at
#                                      # or past what compile fp16 gives at B16-B32)
#   experiments/gpu_runs.sh aoti       # the C++ compiler check, aoti builds of B4 (UNet and VAE
#                                      # in two processes), a fresh-process load + bench + the
#                                      # warm engines build (first frame from the cache)
#   experiments/gpu_runs.sh aoti-all   # aoti builds of B1/8/16/32 (one process per stage and
#                                      # bucket, at once), then bench per bucket
#   experiments/gpu_runs.sh aoti-bg    # the aoti builds of B1/8/16/32 started in a new session
#                                      # (setsid), so they go on after this call returns
#   experiments/gpu_runs.sh aoti-bench # waits for aoti-bg's builds, then benches each bucket
#                                      # (both: AOTI_BUCKETS="4 32"; AOTI_ARGS for max-autotune,
#                                      # the slow builds that only the engine cache can pay;
#                                      # AOTI_BUILD_S, default 900, bounds each build)
#   experiments/gpu_runs.sh e2e1       # one channel voice -> encoded, low-latency setting,
#                                      # nginx-rtmp unpacked from the carried .debs (60 s;
#                                      # E2E_ENGINE, default compile; E2E_ARGS its options,
#                                      # default --compile-freezing)
#   experiments/gpu_runs.sh aoti-live  # aoti builds of AL_BUCKETS (default 4 16 32) with AL_OPTS
#                                      # (default the README's aoti set), then e2e1 with aoti at
#                                      # B4 (AL_E2E=0: not); `channels` with ENGINE=aoti right
#                                      # after, on the same warm host, uses them
#   experiments/gpu_runs.sh live-engines # the channel probe's compile engines at BUCKETS into
#                                      # the engine cache (UNet and VAE at once), so that a
#                                      # `channels` call right after starts from the cache
#   experiments/gpu_runs.sh baseline   # eager + compile bench rows at B1/4/8/16/32
#   experiments/gpu_runs.sh kernels    # kernel time by kind (conv, gemm, norm, ...) per stage:
#                                      # eager at KERNEL_EAGER (default 1,4,16,32) and compile
#                                      # without graphs at each of KERNEL_COMPILE (default "4 32",
#                                      # one process each; KERNEL_ARGS more engine options, e.g.
#                                      # --phase-upsample; KERNEL_ARGS2 a second set beside it,
#                                      # KERNEL_EAGER= none; KERNEL_TIMEOUT_S each, default 560),
#                                      # built at once, profiled in turns
#   experiments/gpu_runs.sh rewrites   # compile rows (manual capture) per RW_JOBS item
#                                      # (BUCKET:OPTIONS; default B4 and B32 with no rewrite,
#                                      # --phase-upsample, both rewrites), one process each, built
#                                      # at once, timed in turns; then the kernel profile with both
#                                      # rewrites (RW_KERNELS=0: not; RW_TIMEOUT_S bounds each
#                                      # process, default 480, and a process stops waiting for
#                                      # its peers' builds 60 s before it; e.g.
#                                      # "4:--phase-upsample transpose")
#   experiments/gpu_runs.sh groupnorm  # group norm + SiLU on the VAE's shapes at B32 and B4:
#                                      # eager, inductor, per-channel statistics, Triton tiles
#                                      # (GN_BATCHES, default "32 4"; GN_TIMEOUT_S each, 280)
#   experiments/gpu_runs.sh aoti-rows  # aoti builds of AOTI_BUCKETS (default 1 4 8 16 32; one
#                                      # process per stage and bucket, all at once), a bench per
#                                      # bucket, the warm engines build at B4 (first frame from the
#                                      # cache), then eager rows at B1/4/8/16/32
#   experiments/gpu_runs.sh autotune   # compile at AT_BUCKET (default 4) with GEMM/conv
#                                      # autotuning for the AT_STAGES (default unet;
#                                      # "unet,vae_decode" tunes both), UNet and VAE built in two
#                                      # processes at once (AT_BUILD_S each, default 420), then a
#                                      # bench row loading both from the cache (AT_ARGS: the
#                                      # rewrites, default both, interleave form)
#   experiments/gpu_runs.sh render     # render's x264 encoder inline against in a thread, the
#                                      # talking-avatar fixture (.carry/yongen.mp4, 704x1216)
#                                      # and the WAV: eager, then compile, fp16 B16, each after an
#                                      # untimed 10 s render, twice per mode (RENDER_ENGINES,
#                                      # RENDER_REPEAT, RENDER_BATCH, RENDER_VIDEO, RENDER_PRESETS)
#   experiments/gpu_runs.sh aoti-graph # where a CUDA graph around an aoti package breaks: small
#                                      # modules (one kind of op each) and both stages at B4,
#                                      # each capture variant in a fresh process
#                                      # (experiments/aoti_graph_probe.py; AG_TARGETS, default
#                                      # both stages; AG_ARGS, default the engine's build loop
#                                      # against the probe's capture)
#   experiments/gpu_runs.sh aoti-fast  # aoti at AF_BUCKETS (default 4) with CUDA graphs, per
#                                      # AF_JOBS item (NAME[@B1,B2]:OPTIONS, ';'-separated; @ its
#                                      # own buckets; default the plain package, freezing +
#                                      # channels-last, and those with both rewrites): each stage
#                                      # and bucket built in its own
#                                      # process, all at once (gated without graphs;
#                                      # AF_BUILD_GRAPHS=1 captures in the building process), then
#                                      # a bench row per bucket and item from the engine cache with
#                                      # graphs, in turns, and one of the last item without
#                                      # (AF_NOGRAPH=0: not); AF_PROBE: aoti_graph_probe variants
#                                      # run beside the builds
#   experiments/gpu_runs.sh cd-rows    # compile with --compile-cd-tuning at CD_BUCKETS (default
#                                      # 32; CD_ARGS the rewrites, default both, transposed):
#                                      # UNet and VAE built at once into the engine cache, then a
#                                      # bench row per bucket if time is left (else run it again on
#                                      # the warm host: the build then comes from the caches)
#   experiments/gpu_runs.sh norm-ceiling # the VAE decoder without its norms' statistics, without
#                                      # its norms, without norms and SiLUs (speed only: what a
#                                      # norm prologue in its convolutions could save at most),
#                                      # one process per variant (NC_VARIANTS, default those
#                                      # four, or e.g. "as_is stats_sums"; NC_BUCKETS, default
#                                      # "4,32"; NC_ARGS the engine options; NC_TIMEOUT_S)
#   experiments/gpu_runs.sh rows       # compile rows (ROWS_COMPILE, default "1 4 8 16 32": one
#                                      # process per bucket) and aoti builds (ROWS_AOTI, default
#                                      # "16 32"), all built at once; each compile process times
#                                      # alone (--gpu-turns), then the aoti buckets are benched
#
# Every aoti build and bench captures CUDA graphs since 702d29b (the default on CUDA; aoti rows
# before it ran without): AOTI_ARGS=--no-cuda-graphs for rows without, e.g. to repeat c386667's.
# Environment: ENGINE (the live probe's engine, default compile), AUDIO_PATH=0 (channels: skip
# the 90 s audio-path probe), LIVE_ARGS (more live options, e.g. "--delay-ms 1000"; the frame
# log, which says when windows and frames came, always goes to $OUT/frames.jsonl.gz), BUCKETS
# (channels: the worker's buckets, default 16), REPEAT (channels: times the WAV is sent, default
# 5), CH_BUDGET_S (channels: the probe ends by this second of the stage, default 590),
# START_TIMEOUT_S (channels: seconds the live process may take to start, default 330), WAV
# (default .carry/eng.wav; 60 s of speech), AOTI_ARGS (more options for every aoti build and
# bench, e.g. "--aoti-max-autotune"), PY (default python3), OUT (default out/gpu_runs),
# AT_SEED (every stage: inductor's tuning record to start from, default
# .carry/autotune_cache.tgz; the record is saved as $OUT/autotune_cache.tgz), MUSETALK_RT_GIT_SHA
# for rows from a copy without .git, ROWS_ARGS (rows: more options for each
# compile row, e.g. "--phase-upsample transpose --channels-last-norm"), ROWS_TIMEOUT_S (rows:
# each compile process, default 500), AOTI_BUILD_S (aoti-rows: each build, default 330; aoti-bg:
# default 900), E2E_ARGS (e2e1: its engine options, default --compile-freezing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/gpu_runs}
WAV=${WAV:-.carry/eng.wav}
R=$OUT/res
# this invocation's logs only (a warm host keeps earlier runs' files in /tmp)
STAGE=${1:-none}
L=/tmp/gpu_runs_logs/$(date +%H%M%S)_$STAGE
mkdir -p "$R" "$L"
SYN=(--weights synthetic --device cuda --models-dir models)
# inductor's record of autotuned operations (a small JSON it rewrites after each one, keyed by
# GPU and toolchain) and its kernels' tuned launch configs: seeded from AT_SEED when that file
# exists, saved with the logs, so that an autotuned (or coordinate-descent) build cut short goes
# on where it stopped and a later one skips the tuning (files already on the host are kept).
# Seen on 2026-12-05: the GEMM autotuning record carried over between H200 runs, but on a fresh
# H100 host all 191 seeded coordinate-descent configs were tuned again (same files rewritten;
# why they were not read is not known), so a cd-tuned build there takes its full 7-8.5 minutes
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_$(id -un)}
SEED=${AT_SEED:-.carry/autotune_cache.tgz}
if [ -f "$SEED" ]; then
  mkdir -p "$TORCHINDUCTOR_CACHE_DIR" &&
    tar xzf "$SEED" --skip-old-files -C "$TORCHINDUCTOR_CACHE_DIR" &&
    echo "inductor's tuning record seeded from $SEED"
fi
pack() {
  tar czf "$OUT/logs_$STAGE.tgz" -C "$(dirname "$L")" "$(basename "$L")"
  # the record of tuned operations and every kernel's chosen launch config (`*.best_config`,
  # beside the kernel's source, named by its hash: coordinate descent's results among them)
  ( cd "$TORCHINDUCTOR_CACHE_DIR" 2>/dev/null &&
    { [ -d cache ] && echo cache; find . -name '*.best_config' -printf '%P\n'; } |
      tar czf "$OUT/autotune_cache.tgz" -T - ) || true
}
trap pack EXIT
# seconds left before a deadline of this stage: left DEADLINE_S
left() { echo $(($1 - SECONDS)); }
# one aoti build of a stage at a bucket, in the background: build_aoti TIMEOUT_S BUCKET STAGE
build_aoti() {
  timeout "$1" "$PY" -m musetalk_rt engines build --engine aoti --dtype fp16 --batch-sizes "$2" \
    --stages "$3" ${AOTI_ARGS:-} "${SYN[@]}" > "$L/build_b${2}_$3.txt" 2>&1 &
}
# aoti bench rows, one bucket after another while the call has time left: bench_aoti BUCKET...
bench_aoti() {
  for b in "$@"; do
    [ $SECONDS -lt 560 ] || break
    timeout $((590 - SECONDS)) "$PY" -m musetalk_rt bench --engine aoti --dtype fp16 \
      --batch-sizes "$b" --iters 50 ${AOTI_ARGS:-} "${SYN[@]}" --out "$R" \
      > "$L/bench_aoti_b$b.txt" 2>&1
    tail -n 2 "$L/bench_aoti_b$b.txt"
  done
}

case "${1:-}" in
autotune)
  # compile with inductor's GEMM/convolution autotuning (Triton templates timed against
  # cuDNN/cuBLAS; no coordinate descent) for AT_STAGES at AT_BUCKET: the UNet and the VAE
  # decoder built in two processes at once (the engine cache keeps each stage's artifacts), then
  # one bench process that loads both, when both built (the tuning record: see AT_SEED above)
  b=${AT_BUCKET:-4}
  read -r -a more <<< "${AT_ARGS---phase-upsample --channels-last-norm}"
  opts=(--engine compile --dtype fp16 --autotune-stages "${AT_STAGES:-unet}" --compile-freezing
        --compile-graph-capture manual "${more[@]}")
  pids=()
  for st in unet vae_decode; do
    ( time timeout "${AT_BUILD_S:-420}" "$PY" -m musetalk_rt engines build "${opts[@]}" \
        --batch-sizes "$b" --stages "$st" "${SYN[@]}" ) > "$L/build_at_b${b}_$st.txt" 2>&1 &
    pids+=($!)
  done
  built=1
  for p in "${pids[@]}"; do wait "$p" || built=0; done
  tail -n 6 "$L"/build_at_b"$b"_*.txt
  for st in unet vae_decode; do
    echo "$st: $(grep -c '^AUTOTUNE ' "$L/build_at_b${b}_$st.txt") operations tuned"
  done
  du -sh "$TORCHINDUCTOR_CACHE_DIR" ~/.triton/cache 2>/dev/null
  [ "$built" = 1 ] || { echo "autotune: a build did not finish; no bench" >&2; exit 3; }
  timeout "$(left 590)" "$PY" -m musetalk_rt bench "${opts[@]}" --batch-sizes "$b" --iters 100 \
    "${SYN[@]}" --out "$R" > "$L/bench_at_b$b.txt" 2>&1
  tail -n 5 "$L/bench_at_b$b.txt"
  ;;
channels)
  if [ "${AUDIO_PATH:-1}" = 1 ]; then
    timeout 90 "$PY" experiments/audio_path_probe.py --engine canvas --weights synthetic \
      --device cuda --wav "$WAV" --seconds 20 --channels 16 --outputs --out "$R" \
      > "$L/audio_path.txt" 2>&1
    grep -h "channels," "$L/audio_path.txt"
  fi
  left=$((${CH_BUDGET_S:-590} - SECONDS))
  [ "$left" -ge 60 ] || { echo "channels: ${left} s left of CH_BUDGET_S, no live probe" >&2; exit 3; }
  # this call's run only: the frame log is appended to and a warm host keeps earlier calls'
  # logs and --profile files in the work folder (the prepared avatar there is kept)
  rm -f /tmp/lp/frames_n*.jsonl /tmp/lp/live_n*.log /tmp/lp/*.json
  timeout -k 75 "$left" "$PY" experiments/live_probe.py --avatar probe --wav "$WAV" \
    --repeat "${REPEAT:-5}" --channels "${2:-12}" --weights synthetic --engine "${ENGINE:-compile}" \
    --dtype fp16 --batch-sizes "${BUCKETS:-16}" --work /tmp/lp --out "$R" \
    --start-timeout-s "${START_TIMEOUT_S:-330}" \
    $([ "${ENGINE:-compile}" = compile ] && echo --compile-freezing) \
    --frame-log "/tmp/lp/frames_n{n}.jsonl" ${LIVE_ARGS:-} \
    > "$L/live_probe.txt" 2>&1
  tail -3 "$L/live_probe.txt"
  cp /tmp/lp/live_n*.log /tmp/lp/*.json "$L/" 2>/dev/null  # the logs, a --profile FILE.json
  # where the time went, per 30 s (the windows' lead and its parts, batches, late frames)
  "$PY" -m musetalk_rt.live.framelog "/tmp/lp/frames_n${2:-12}.jsonl" --bin-s 30 \
    > "$L/frames_summary_n${2:-12}.txt" 2>&1
  cut -c1-200 "$L/frames_summary_n${2:-12}.txt"
  gzip -c /tmp/lp/frames_n*.jsonl > "$OUT/frames.jsonl.gz" 2>/dev/null
  ;;
aoti)
  { echo "CXX=${CXX:-}"; which -a g++ c++ 2>/dev/null
    "$PY" -c "import torch._inductor.cpp_builder as c; print('inductor default:', c.get_cpp_compiler())"
    "$PY" -c "from musetalk_rt.engines.aoti import pick_cxx; import os; print(pick_cxx((os.environ.get('CXX'), 'g++', 'c++', 'clang++')))"
  } > "$L/compiler.txt" 2>&1
  cat "$L/compiler.txt"
  for st in unet vae_decode; do
    build_aoti 400 4 "$st"
  done
  wait
  tail -n 3 "$L"/build_b4_*.txt
  timeout 120 "$PY" -m musetalk_rt bench --engine aoti --dtype fp16 --batch-sizes 4 --iters 100 \
    "${SYN[@]}" --out "$R" > "$L/bench_aoti_b4.txt" 2>&1
  tail -n 4 "$L/bench_aoti_b4.txt"
  ( time timeout 120 "$PY" -m musetalk_rt engines build --engine aoti --dtype fp16 \
      --batch-sizes 4 "${SYN[@]}" ) > "$L/warm_build_b4.txt" 2>&1
  tail -n 6 "$L/warm_build_b4.txt"
  ;;
aoti-all)
  for b in 1 8 16 32; do
    for st in unet vae_decode; do
      build_aoti 480 "$b" "$st"
    done
  done
  wait
  bench_aoti 1 8 16 32
  ;;
aoti-bg)
  mkdir -p /tmp/aoti_bg
  for b in ${AOTI_BUCKETS:-16 32 8 1}; do
    for st in unet vae_decode; do
      setsid nohup timeout "${AOTI_BUILD_S:-900}" "$PY" -m musetalk_rt engines build \
        --engine aoti --dtype fp16 --batch-sizes "$b" --stages "$st" ${AOTI_ARGS:-} "${SYN[@]}" \
        > "/tmp/aoti_bg/build_b${b}_$st.txt" 2>&1 < /dev/null &
    done
  done
  sleep 2
  pgrep -fc "engines build --engine aoti" || true
  ;;
aoti-bench)
  while pgrep -f "engines build" > /dev/null && [ $SECONDS -lt 420 ]; do
    sleep 5
  done
  echo "builds waited for: ${SECONDS} s"
  cp /tmp/aoti_bg/*.txt "$L/" 2>/dev/null
  tail -n 2 /tmp/aoti_bg/*.txt
  bench_aoti ${AOTI_BUCKETS:-16 32 8 1}
  ;;
render)
  rv=(--video "${RENDER_VIDEO:-.carry/yongen.mp4}" --bbox 250,300,470,560 --audio "$WAV"
      --weights synthetic --dtype fp16 --batch-size "${RENDER_BATCH:-16}" --out "$R"
      --repeat "${RENDER_REPEAT:-2}" --warmup-s 10 --x264-presets "${RENDER_PRESETS:-veryfast}")
  for e in ${RENDER_ENGINES:-eager compile}; do
    [ "$(left 580)" -gt 30 ] || { echo "render: no time left for $e" >&2; break; }
    # recompiles logged: a compile render once paid for a second build at its partial batch
    TORCH_LOGS=recompiles timeout "$(left 580)" "$PY" experiments/render_encode.py "${rv[@]}" \
      --engines "$e" > "$L/render_$e.txt" 2>&1
    grep -h "Recompiling\|guard failure\|mismatch" "$L/render_$e.txt" | cut -c1-200
    grep '^{"render_encode"' "$L/render_$e.txt" | tail -n 1  # the last summary, even if cut short
  done
  ;;
live-engines)
  # the channel probe's compile engines (BUCKETS, default 16 as `channels`; LIVE_ENGINE_ARGS: the
  # options of the H100's 16-channel run) built into the engine cache, UNet and VAE in two
  # processes at once, keyed as the live process keys them (manual capture): a `channels` call
  # right after on the same warm host then starts from the cache instead of ~280 s of compiles,
  # which leaves its 5-minute probe room inside one run. The options must be those `channels`
  # gives the live process (--compile-freezing and its LIVE_ARGS' engine options), or the
  # live process misses the cache and compiles again.
  read -r -a le_opts <<< "${LIVE_ENGINE_ARGS---compile-freezing --phase-upsample transpose --channels-last-norm}"
  pids=()
  for st in unet vae_decode; do
    timeout -k 10 "$(left 580)" "$PY" -m musetalk_rt engines build --engine compile \
      --dtype fp16 --batch-sizes "${BUCKETS:-16}" --stages "$st" --compile-graph-capture manual \
      "${le_opts[@]}" "${SYN[@]}" > "$L/build_live_$st.txt" 2>&1 &
    pids+=($!)
  done
  built=1
  for p in "${pids[@]}"; do wait "$p" || built=0; done
  echo "live engines: ${SECONDS} s"
  for f in "$L"/build_live_*.txt; do echo "== $(basename "$f")"; grep -v Warning "$f" | tail -n 2 | cut -c1-220; done
  [ "$built" = 1 ] || { echo "live-engines: a build failed or ran out of time" >&2; exit 3; }
  ;;
e2e1)
  eval "$("$PY" -m musetalk_rt.testing.rtmp unpack .debs /tmp/nginx-root)"
  timeout "$(left 590)" "$PY" -m musetalk_rt bench e2e --engine "${E2E_ENGINE:-compile}" \
    --dtype fp16 --batch-sizes 4 --stream-lookahead-ms 0 --delay-margin-ms 40 --duration-s 60 \
    ${E2E_ARGS---compile-freezing} "${SYN[@]}" --out "$R" > "$L/e2e1.txt" 2>&1
  tail -n 12 "$L/e2e1.txt"
  ;;
aoti-live)
  # the aoti engines of the live runs (AL_BUCKETS, default "4 16 32"; AL_OPTS, default the
  # README's aoti set), each stage and bucket in its own process, all at once and gated without
  # graphs (the package and its cache key are the same with them); then one channel
  # voice->encoded with aoti at B4 (as e2e1); a `channels` call right after, on the same warm
  # host, finds the B16/B32 engines in the cache (ENGINE=aoti LIVE_ARGS="... $AL_OPTS")
  read -r -a al_opts <<< "${AL_OPTS:---compile-freezing --aoti-channels-last --phase-upsample transpose --channels-last-norm}"
  for b in ${AL_BUCKETS:-4 16 32}; do
    for st in unet vae_decode; do
      timeout "${AOTI_BUILD_S:-400}" "$PY" -m musetalk_rt engines build --engine aoti \
        --dtype fp16 --batch-sizes "$b" --stages "$st" --no-cuda-graphs "${al_opts[@]}" \
        "${SYN[@]}" > "$L/build_b${b}_$st.txt" 2>&1 &
    done
  done
  wait
  echo "aoti built: ${SECONDS} s"
  for f in "$L"/build_*.txt; do echo "== $(basename "$f")"; grep -v Warning "$f" | tail -n 1 | cut -c1-220; done
  [ "${AL_E2E:-1}" = 1 ] || exit 0  # AL_E2E=0: the builds alone
  [ "$(left 560)" -gt 120 ] || { echo "aoti-live: no time left for the one-channel run" >&2; exit 3; }
  eval "$("$PY" -m musetalk_rt.testing.rtmp unpack .debs /tmp/nginx-root)"
  timeout "$(left 590)" "$PY" -m musetalk_rt bench e2e --engine aoti --dtype fp16 --batch-sizes 4 \
    --stream-lookahead-ms 0 --delay-margin-ms 40 --duration-s 60 --start-timeout-s 120 \
    "${al_opts[@]}" "${SYN[@]}" --out "$R" > "$L/e2e1_aoti.txt" 2>&1
  tail -n 12 "$L/e2e1_aoti.txt" | cut -c1-400
  ;;
baseline)
  rm -rf /tmp/gpu_turns  # a warm host keeps the last call's turn marks: start clean
  common=(--dtype fp16 --batch-sizes 1,4,8,16,32 --iters 50 "${SYN[@]}" --out "$R"
          --gpu-turns /tmp/gpu_turns --gpu-peers 2)
  timeout 560 "$PY" -m musetalk_rt bench --engine eager "${common[@]}" \
    > "$L/bench_eager.txt" 2>&1 &
  timeout 560 "$PY" -m musetalk_rt bench --engine compile --compile-freezing \
    --compile-graph-capture manual "${common[@]}" > "$L/bench_compile.txt" 2>&1 &
  wait
  tail -n 8 "$L"/bench_*.txt
  ;;
kernels)
  rm -rf /tmp/gpu_turns_k  # a warm host keeps the last call's turn marks: start clean
  sets=("${KERNEL_ARGS:-}")
  [ -n "${KERNEL_ARGS2+x}" ] && sets+=("$KERNEL_ARGS2")
  n_compile=$(($(wc -w <<< "${KERNEL_COMPILE-4 32}") * ${#sets[@]}))
  eager=${KERNEL_EAGER-1,4,16,32}  # set empty: no eager profile
  [ -n "$eager" ] && n_eager=1 || n_eager=0
  turns=(--gpu-turns /tmp/gpu_turns_k --gpu-peers "$((n_eager + n_compile))")
  if [ "$n_eager" = 1 ]; then
    timeout "${KERNEL_TIMEOUT_S:-560}" "$PY" experiments/kernel_profile.py --engines eager \
      --batch-sizes "$eager" --out "$R" "${turns[@]}" \
      > "$L/kernels_eager.txt" 2>&1 &
  fi
  for i in "${!sets[@]}"; do
    for b in ${KERNEL_COMPILE-4 32}; do
      timeout "${KERNEL_TIMEOUT_S:-560}" "$PY" experiments/kernel_profile.py --engines compile \
        --batch-sizes "$b" --compile-freezing ${sets[$i]} --out "$R" "${turns[@]}" \
        > "$L/kernels_compile_b${b}_set$i.txt" 2>&1 &
    done
  done
  wait
  echo "kernels: ${SECONDS} s"
  grep -h -v "^{" "$L"/kernels_*.txt | cut -c1-160
  ;;
rewrites)
  # RW_JOBS: comma-separated BUCKET:OPTIONS (';'-separated when an item's options hold a comma,
  # as --inductor-config a=1,b=2 does), one bench process each (built at once, timed in turns);
  # RW_KERNELS=0 skips the kernel profile after them
  sep=,; [[ ${RW_JOBS:-} == *";"* ]] && sep=";"
  IFS=$sep read -r -a jobs <<< "${RW_JOBS:-4:,32:,4:--phase-upsample,32:--phase-upsample,4:--phase-upsample --channels-last-norm,32:--phase-upsample --channels-last-norm}"
  rm -rf /tmp/gpu_turns_rw  # a warm host keeps the last call's turn marks: start clean
  i=0
  for job in "${jobs[@]}"; do
    [[ $job == *:* ]] || { echo "RW_JOBS item '$job': write BUCKET:OPTIONS" >&2; exit 2; }
    b=${job%%:*}
    timeout "${RW_TIMEOUT_S:-480}" "$PY" -m musetalk_rt bench --engine compile --compile-freezing \
      --compile-graph-capture manual --dtype fp16 --batch-sizes "$b" --iters 50 ${job#*:} \
      "${SYN[@]}" --out "$R" --gpu-turns /tmp/gpu_turns_rw --gpu-peers ${#jobs[@]} \
      --gpu-peers-deadline-s $((${RW_TIMEOUT_S:-480} - 60)) \
      > "$L/bench_rw${i}_b$b.txt" 2>&1 &
    i=$((i + 1))
  done
  wait
  echo "rewrites built and timed: ${SECONDS} s"
  tail -qn 1 "$L"/bench_rw*.txt | cut -c1-220
  if [ "${RW_KERNELS:-1}" = 1 ] && [ $SECONDS -lt 450 ]; then
    timeout $((590 - SECONDS)) "$PY" experiments/kernel_profile.py --engines compile \
      --batch-sizes 4,32 --compile-freezing --phase-upsample --channels-last-norm --out "$R" \
      > "$L/kernels_rw.txt" 2>&1
    grep -v "^{" "$L/kernels_rw.txt" | cut -c1-160
  fi
  ;;
norm-ceiling)
  # experiments/norm_ceiling.py: the VAE decoder as built, without its norms' statistics,
  # without its norms, and without norms and SiLUs, at NC_BUCKETS (default "4,32"); one process
  # per variant, built at once and timed in turns; NC_ARGS the engine options (default the
  # H100 rows': freezing, manual capture, both rewrites)
  rm -rf /tmp/gpu_turns_nc
  read -r -a nc_opts <<< "${NC_ARGS-"--compile-freezing --compile-graph-capture manual --phase-upsample transpose --channels-last-norm"}"
  read -r -a nc_variants <<< "${NC_VARIANTS:-as_is affine_only no_norm no_norm_no_silu}"
  for v in "${nc_variants[@]}"; do
    timeout "${NC_TIMEOUT_S:-560}" "$PY" experiments/norm_ceiling.py --variants "$v" \
      --batch-sizes "${NC_BUCKETS:-4,32}" "${nc_opts[@]}" --weights synthetic --device cuda \
      --models-dir models --out "$R" --gpu-turns /tmp/gpu_turns_nc --gpu-peers "${#nc_variants[@]}" \
      > "$L/norm_ceiling_$v.txt" 2>&1 &
  done
  wait
  echo "norm ceiling: ${SECONDS} s"
  grep -h " modules changed" "$L"/norm_ceiling_*.txt
  ;;
groupnorm)
  for b in ${GN_BATCHES:-32 4}; do
    timeout "${GN_TIMEOUT_S:-280}" "$PY" experiments/groupnorm_bench.py --batch "$b" --out "$R" \
      > "$L/groupnorm_b$b.txt" 2>&1
    cut -c1-160 "$L/groupnorm_b$b.txt"
  done
  ;;
rows)
  for b in ${ROWS_AOTI-16 32}; do
    for st in unet vae_decode; do
      build_aoti 420 "$b" "$st"
    done
  done
  compile_buckets=(${ROWS_COMPILE-1 4 8 16 32})
  rm -rf /tmp/gpu_turns_rows  # a warm host keeps the last call's turn marks: start clean
  for b in "${compile_buckets[@]}"; do
    timeout "${ROWS_TIMEOUT_S:-500}" "$PY" -m musetalk_rt bench --engine compile \
      --compile-freezing --compile-graph-capture manual --dtype fp16 --batch-sizes "$b" \
      --iters 50 ${ROWS_ARGS:-} "${SYN[@]}" \
      --out "$R" --gpu-turns /tmp/gpu_turns_rows --gpu-peers "${#compile_buckets[@]}" \
      > "$L/bench_compile_b$b.txt" 2>&1 &
  done
  wait
  echo "built and timed: ${SECONDS} s"
  tail -n 2 "$L"/build_b*.txt "$L"/bench_compile_b*.txt 2>/dev/null
  bench_aoti ${ROWS_AOTI-16 32}
  ;;
cd-rows)
  # compile with coordinate-descent tuning: a B32 build alone took 451 s on an H100 (UNet 326 s,
  # VAE 125 s, one after the other), too long to build and time in one call. Each bucket's two
  # stages build at once (--jobs 2) into the engine cache; the bench rows come in the same call
  # if time is left, else in the next call on the same warm host (the cache and inductor's own
  # caches make its build short)
  # CD_ARGS empty (set, "") builds without the rewrites
  read -r -a cd_opts <<< "--compile-freezing --compile-graph-capture manual --compile-cd-tuning ${CD_ARGS-"--phase-upsample transpose --channels-last-norm"}"
  built=()
  for b in ${CD_BUCKETS:-32}; do
    # `timeout 0` would mean no limit at all: a build starts only with a minute left
    [ "$(left 560)" -gt 60 ] || { echo "cd-rows: no time left to build b$b here" >&2; break; }
    timeout "$(left 560)" "$PY" -m musetalk_rt engines build --engine compile --dtype fp16 \
      --batch-sizes "$b" --jobs 2 "${cd_opts[@]}" "${SYN[@]}" > "$L/build_cd_b$b.txt" 2>&1
    echo "== build b$b (${SECONDS} s)"; tail -n 1 "$L/build_cd_b$b.txt" | cut -c1-300
    grep -q '"passed": true' "$L/build_cd_b$b.txt" && built+=("$b")
  done
  for b in "${built[@]}"; do
    [ "$(left 590)" -gt 150 ] || { echo "cd-rows: no time left to bench b$b here" >&2; break; }
    timeout "$(left 590)" "$PY" -m musetalk_rt bench --engine compile --dtype fp16 \
      --batch-sizes "$b" --iters 50 "${cd_opts[@]}" "${SYN[@]}" --out "$R" \
      > "$L/bench_cd_b$b.txt" 2>&1
    tail -n 1 "$L/bench_cd_b$b.txt" | cut -c1-300
  done
  ;;
aoti-rows)
  buckets=(${AOTI_BUCKETS:-1 4 8 16 32})
  for b in "${buckets[@]}"; do
    for st in unet vae_decode; do
      build_aoti "${AOTI_BUILD_S:-330}" "$b" "$st"
    done
  done
  wait
  echo "aoti built: ${SECONDS} s"
  tail -qn 1 "$L"/build_b*.txt | cut -c1-200
  for b in "${buckets[@]}"; do
    [ "$(left 480)" -gt 20 ] || break
    timeout "$(left 480)" "$PY" -m musetalk_rt bench --engine aoti --dtype fp16 \
      --batch-sizes "$b" --iters 50 ${AOTI_ARGS:-} "${SYN[@]}" --out "$R" \
      > "$L/bench_aoti_b$b.txt" 2>&1
    tail -n 1 "$L/bench_aoti_b$b.txt" | cut -c1-200
  done
  ( time timeout "$(left 510)" "$PY" -m musetalk_rt engines build --engine aoti --dtype fp16 \
      --batch-sizes 4 ${AOTI_ARGS:-} "${SYN[@]}" ) > "$L/warm_build_b4.txt" 2>&1
  tail -n 6 "$L/warm_build_b4.txt"
  [ "$(left 590)" -gt 30 ] && timeout "$(left 590)" "$PY" -m musetalk_rt bench --engine eager \
    --dtype fp16 --batch-sizes 1,4,8,16,32 --iters 30 "${SYN[@]}" --out "$R" \
    > "$L/bench_eager.txt" 2>&1
  tail -n 6 "$L/bench_eager.txt"
  ;;
aoti-fast)
  buckets=${AF_BUCKETS:-4}
  buckets=${buckets//,/ }
  graphs=(--no-cuda-graphs)  # gated without graphs (aoti captures by default)
  [ "${AF_BUILD_GRAPHS:-0}" = 1 ] && graphs=()
  # the probe's variants (AF_PROBE, e.g. "graph_freed,engine") beside the builds, at the first
  # bucket; the builds' `wait` waits for it too, so the bench rows time alone
  if [ -n "${AF_PROBE:-}" ]; then
    read -r -a bs <<< "$buckets"
    timeout "$(left 420)" "$PY" experiments/aoti_graph_probe.py --out "$R" --batch "${bs[0]}" \
      --targets unet,vae_decode --variants "$AF_PROBE" --pairs "" --sanitize none --iters 0 \
      > "$L/aoti_graph_probe.txt" 2>&1 &
  fi
  # one bench row from the engine cache while the call has time: af_bench BUCKET LABEL OPTIONS...
  af_bench() {
    local b=$1 label=$2
    shift 2
    [ "$(left 575)" -gt 30 ] || return 1
    timeout "$(left 585)" "$PY" -m musetalk_rt bench --engine aoti --dtype fp16 \
      --batch-sizes "$b" --iters 50 "$@" "${SYN[@]}" --out "$R" > "$L/bench_${label}_b$b.txt" 2>&1
    echo "== bench $label b$b"; tail -n 1 "$L/bench_${label}_b$b.txt" | cut -c1-400
  }
  IFS=';' read -r -a jobs <<< "${AF_JOBS:-plain:;frz:--compile-freezing --aoti-channels-last;frz_rw:--compile-freezing --aoti-channels-last --phase-upsample --channels-last-norm}"
  # a job's name, options and buckets (NAME@B1,B2 overrides AF_BUCKETS): af_job ITEM
  af_job() {
    name=${1%%:*}
    read -r -a opts <<< "${1#*:}"
    jb=$buckets
    if [[ $name == *@?* ]]; then jb=${name#*@}; jb=${jb//,/ }; fi
    name=${name%%@*}
  }
  for j in "${jobs[@]}"; do
    af_job "$j"
    for b in $jb; do
      for st in unet vae_decode; do
        timeout "${AF_BUILD_S:-400}" "$PY" -m musetalk_rt engines build --engine aoti \
          --dtype fp16 --batch-sizes "$b" --stages "$st" "${graphs[@]}" "${opts[@]}" \
          "${SYN[@]}" > "$L/build_${name}_b${b}_$st.txt" 2>&1 &
      done
    done
  done
  wait
  echo "aoti built: ${SECONDS} s"
  [ -f "$L/aoti_graph_probe.txt" ] && grep -v Warning "$L/aoti_graph_probe.txt" | tail -n 12
  for f in "$L"/build_*.txt; do echo "== $(basename "$f")"; grep -v Warning "$f" | tail -n 3 | cut -c1-220; done
  for j in "${jobs[@]}"; do
    af_job "$j"
    for b in $jb; do
      af_bench "$b" "$name" --aoti-cuda-graphs "${opts[@]}" || break 2
    done
  done
  af_job "${jobs[${#jobs[@]}-1]}"  # the last item without graphs, at its first bucket
  read -r -a bs <<< "$jb"
  if [ "${AF_NOGRAPH:-1}" = 1 ]; then
    af_bench "${bs[0]}" "${name}_nograph" --no-cuda-graphs "${opts[@]}" || true
  fi
  ;;
aoti-graph)
  # default: the engine's build loop against the probe's capture, both stages and the pair
  timeout 590 "$PY" experiments/aoti_graph_probe.py --out "$R" \
    --targets "${AG_TARGETS:-unet,vae_decode}" \
    ${AG_ARGS:---variants graph,engine,engine_models,engine_build --sanitize none --iters 0} \
    2>&1 | tee "$L/aoti_graph_probe.txt" |
    grep -v Warning | tail -n 60
  ;;
*)
  echo "usage: experiments/gpu_runs.sh" \
    "channels|live-engines|aoti|aoti-live|aoti-graph|aoti-fast|aoti-all|aoti-bg|aoti-bench|aoti-rows|cd-rows|e2e1|render|baseline|kernels|rewrites|norm-ceiling|groupnorm|autotune|rows" >&2
  exit 2
  ;;
esac
