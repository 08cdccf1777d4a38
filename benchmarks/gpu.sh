#!/usr/bin/env bash
# Figure 7 of the benchmark suite, for a machine with a CUDA GPU (issue 5):
# ResNet-50 and Inception v3 at batch 256 under bf16 autocast, images per
# second of the bare forward vs probekit's extraction, and probe-fitting
# throughput on the GPU. Writes benchmarks/results/gpu.json.
#   benchmarks/gpu.sh [--batch 256] [--reps 10] [--fit-examples 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
exec "$PY" -m benchmarks.gpu "$@"
