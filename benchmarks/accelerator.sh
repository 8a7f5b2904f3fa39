#!/usr/bin/env bash
# Accelerator check (about 8 minutes on one GPU): G's train step (float32, bfloat16) and samplers and
# the FPN train step against diffusers / torch.compile / smp, appended to benchmarks/RESULTS.md.
#
#   bash benchmarks/accelerator.sh                      # on the accelerator machine
#   bash benchmarks/accelerator.sh --tiny --no-peer --output=/tmp/RESULTS.md   # CPU smoke run
#
# Extra arguments go to `python -m benchmarks.accelerator` (see its --help). SATSYNTH_BENCH_RESULTS
# names the RESULTS file when --output is not given.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
fi
# 480 s of stages at most (--budget_s stops starting new ones at 420 s); the rest is start-up.
exec timeout "${ACCELERATOR_TIMEOUT_S:-470}" "$PYTHON" -m benchmarks.accelerator "$@"
