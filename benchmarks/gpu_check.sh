#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): on a CUDA machine, the whole Split-MNIST
# leaderboard (every strategy, 3 settings, 1 seed) and the stacked small-batch benchmark on the
# GPU, with the CPU beside them; wall-clock, GPU memory and the CPU/GPU ratios go to one JSON file.
# It installs nothing beyond the README's set-up (`make install`), fetches MNIST, and falls back
# to the CPU, saying so in the JSON, where there is no CUDA device.
#   bash benchmarks/gpu_check.sh [OUT.json] [extra arguments of benchmarks/gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check.json}
shift || true
make --no-print-directory install
.venv/bin/cfbench data fetch mnist
.venv/bin/python -m benchmarks.gpu_check --out "$out" "$@"
