#!/usr/bin/env bash
# Figure 7 of the benchmark suite, for a machine with a CUDA GPU: ResNet-50 and
# Inception v3 at batch 256 under bf16 autocast, images per second of the bare
# forward vs probekit's extraction; probe-fitting throughput on the GPU; and a
# whole pk.probe of Inception v3 on 50,000 synthetic images against the bare
# bf16 forward. About five minutes of device time at most (--smoke: under one).
# Writes benchmarks/results/gpu.json.
#   benchmarks/gpu.sh [--smoke] [--batch 256] [--reps 10] [--fit-examples 20000] [--e2e-images 50000]
#   benchmarks/gpu.sh --smoke --device cpu   # checks the script itself where there is no GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
device=cuda
previous=""
for arg in "$@"; do
  case "$arg" in --device=*) device="${arg#--device=}" ;; esac
  if [ "$previous" = "--device" ]; then device="$arg"; fi
  previous="$arg"
done
if [ "${device%%:*}" != "cpu" ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
fi
exec "$PY" -m benchmarks.gpu "$@"
