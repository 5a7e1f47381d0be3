#!/usr/bin/env bash
# Every GPU measurement in one run (a lent GPU machine's time is short): from the repository root,
#   bench/gpu_all.sh OUT_DIR [NAME]
# 0. tests/test_cuda.py and the families' captured-graph test (the GPU-only tests).
# 1. bench/gpu.sh: random-weight Mistral-7B bf16, 8 rank-16 mixes: bs1 decode vs the bandwidth bound,
#    32 rows over 8 mixes vs one, CUDA graphs vs eager, lowrank TIES merge of the whole 7B.
# 2. A random Mistral-7B (32 layers, bf16) and four rank-16 adapters written to /tmp, then
#    bench.serve through `mixserve serve --device cuda --dtype bfloat16` (nothing else about memory:
#    the KV pool and the mix cache size themselves from the device), against PEFT's mixed-batch
#    generate on the same GPU (its mixes built with `cat`: ties_svd would take an SVD per module).
# 3. bench.cold on that 7B: cold mixes' merge time and time to first token against a warm mix's.
# 4. bench.serve on the demo model on the GPU (mixserve only).
# The caps add up to 550 s, under one device command's 10 minutes with the set-up around them; bench.serve writes its report after every
# scenario, so a stage stopped by its cap keeps what it measured. On the H200 (2026-11-30) the 7B
# serving stage took ~45 s to start, ~35 s of mixserve scenarios, ~85 s of PEFT up to c=8.
# Each stage has a time cap and a failed stage does not stop the next; everything goes to OUT_DIR.
# A CPU smoke run of the same stages: DEVICE=cpu LAYERS=1 TINY=1 bench/gpu_all.sh /tmp/gpu-all
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_all.sh OUT_DIR [NAME]}
name=${2:-gpu}
device=${DEVICE:-cuda}
layers=${LAYERS:-32}
tiny=${TINY:+--tiny}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
log="$out/log.txt"
stage() {  # stage SECONDS LABEL COMMAND...
    local cap=$1 label=$2
    shift 2
    echo "=== $label (cap ${cap}s) $(date -u +%T)" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$log" | tail -40
    echo "=== $label: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$log"
stage 110 "tests/test_cuda.py + the families (graph capture, serve on CUDA)" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_families.py -m gpu
stage 110 "gpu.sh (Mistral-7B bf16)" python3 -m bench.gpu $tiny --out "$out/$name"
stage 70 "random Mistral-7B bf16 + adapters" python3 -m bench.random_model --out /tmp/m7b --layers "$layers" \
    --dtype bfloat16 --device "$device"
stage 170 "bench.serve, Mistral-7B on the GPU" python3 -m bench.serve --model /tmp/m7b --adapters /tmp/m7b-adapters \
    --device "$device" --dtype bfloat16 --concurrency 1,8,32 --rounds 1 --max-tokens 32 --skip-cold \
    --skip-peft-naive --peft-combination cat --out "$out/serve-$name-mistral7b"
stage 60 "bench.cold, Mistral-7B on the GPU" python3 -m bench.cold --model /tmp/m7b --adapters /tmp/m7b-adapters \
    --mixes 4 --server-args "--device $device --dtype bfloat16" --out "$out/cold-$name-mistral7b"
stage 30 "bench.serve, demo on the GPU" python3 -m bench.serve --device "$device" --dtype bfloat16 \
    --concurrency 1,8,32 --rounds 1 --skip-peft --skip-cold --out "$out/serve-$name-demo"
