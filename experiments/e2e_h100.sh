#!/usr/bin/env bash
# The end-to-end probe on a GPU host: one channel, the best engine (compile, fp16, bucket 4,
# inductor freezing), the RTMP server on the same host, voice-to-received over loopback.
#
# The host needs no package access: Debian's nginx, its rtmp module and the libraries they link
# (glibc included) are unpacked from the .deb files in $DEBS into a private prefix, never into /,
# and run with the prefix's own dynamic loader (musetalk_rt.testing.rtmp.unpack_debs).
#
#   experiments/e2e_h100.sh                  # rows and logs under $OUT
#
# Environment (all optional):
#   OUT          where rows go (default: out/e2e_h100): e2e.jsonl, work/ (frame log, live log)
#   DEBS         folder of .deb files (default: .debs; experiments/README.md lists them)
#   DURATION_S   seconds of sender audio (default: 120)
#   PY           the Python with the dependencies (default: .venv/bin/python, else python3)
#   WEIGHTS      real | synthetic | tiny (default: synthetic)
#   DEVICE       cuda | cpu (default: cuda)
#   ENGINE_ARGS  default: "--engine compile --dtype fp16 --batch-sizes 4 --compile-freezing"
#   EXTRA        more bench e2e options, e.g. "--delay-ms 400"
# A dry run of the unpack-and-run path on a CPU machine:
#   DEVICE=cpu WEIGHTS=tiny ENGINE_ARGS="--engine eager --dtype fp32" DURATION_S=13 \
#     EXTRA="--stream-hop 25 --delay-ms 3000" experiments/e2e_h100.sh
# Rows from a copy without .git: set MUSETALK_RT_GIT_SHA to the commit (bench rows do the same).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/e2e_h100}
DEBS=${DEBS:-.debs}
DURATION_S=${DURATION_S:-120}
WEIGHTS=${WEIGHTS:-synthetic}
DEVICE=${DEVICE:-cuda}
ENGINE_ARGS=${ENGINE_ARGS:---engine compile --dtype fp16 --batch-sizes 4 --compile-freezing}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# this checkout's package, for the probe and the processes it starts
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
import importlib.util
mods = ["torch", "diffusers", "transformers", "av", "soxr", "websockets", "silero_vad", "cv2"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "e2e_h100: $PY lacks: $missing (install the package's dependencies first)" >&2
  exit 3
fi
mkdir -p "$OUT"
PREFIX=$(mktemp -d "${TMPDIR:-/tmp}/nginx-root.XXXXXX")
# prints: export MUSETALK_RT_NGINX=...; export MUSETALK_RT_NGINX_RTMP_MODULE=...
eval "$("$PY" -m musetalk_rt.testing.rtmp unpack "$DEBS" "$PREFIX")"
"$MUSETALK_RT_NGINX" -v
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
# shellcheck disable=SC2086  # ENGINE_ARGS and EXTRA are lists of options
"$PY" -m musetalk_rt bench e2e --weights "$WEIGHTS" --device "$DEVICE" $ENGINE_ARGS \
  --duration-s "$DURATION_S" --window-s 30 --out "$OUT" --work "$OUT/work" ${EXTRA:-}
