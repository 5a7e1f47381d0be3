#!/usr/bin/env bash
# The accelerator benchmark (bench/gpu.py): a random-weight Mistral-7B in bf16 with 8 rank-16 mixes.
# On a GPU machine, from the repository root:   bench/gpu.sh --out bench/results/gpu-<gpu name>
# Anywhere (tiny shape, CPU without a GPU):    bench/gpu.sh --tiny --out /tmp/gpu-tiny
# Finishes in well under 8 minutes on an H100-class GPU; prints the table it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m bench.gpu "$@"
