#!/usr/bin/env bash
# GPU performance check of the prune loop and recovery training, offline, < 8 min on one H200.
#
#   bash benchmarks/fetch_gpu_wheels.sh        # once, with network: wheels into .whl/
#   bash benchmarks/gpu_check.sh               # Llama-3.1-8B shape, random bf16 weights, cuda
#   bash benchmarks/gpu_check.sh --device cpu --shape tiny   # the same check, CPU-sized (seconds)
#
# What it runs (benchmarks/perf.py `gpu`): builds the shape on the device, runs 50 adaptive
# iterations to 20% sparsity on 16×512 calibration tokens timing every part (calibrate =
# similarity + Taylor gradients from one pass, score, plan, surgery) next to a plain
# forward+backward over the same tokens; rebuilds the pruned model the way the recipe's resize
# does (meta build, sliced load, AdamW moments carried) and trains a few steps, then the same
# steps on a freshly built model with the same widths (what the stock recipe trains); peak
# memory of prune vs train; scaling on the Llama-3.2-1B shape. Prints the ratios and absolute
# seconds and writes $OUT/gpu_check.json (or benchmarks/results/gpu_check.json).
#
# Extra arguments go to `perf.py gpu` (e.g. --iterations 10 --calib 16x512 --train 4x1024).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
shape=llama3_1_8b
scaling=llama3_2_1b
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --shape) shape="$2"; shift 2 ;;
    --scaling) scaling="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ "$device" = cpu ] && [ "$shape" = tiny ]; then
  # CPU-sized: a few iterations, short calibration and training windows.
  args=(--iterations 4 --calib 8x32 --calib-batch 4 --train 2x64 --train-steps 3 "${args[@]}")
  [ "$scaling" = llama3_2_1b ] && scaling=""
fi

site="${SITE:-/tmp/site}"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD:$PWD/recipes${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in .whl/ (run benchmarks/fetch_gpu_wheels.sh); using installed packages"
  export PYTHONPATH="$PWD:$PWD/recipes${PYTHONPATH:+:$PYTHONPATH}"
fi
# torchtune imports datasets/tokenizer libraries at import time that this check never calls;
# where one is missing, perf.py puts an inert stand-in module in its place (logged).
export PERF_STUB_MISSING=1
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec timeout 460 python3 benchmarks/perf.py gpu --device "$device" --shape "$shape" \
  ${scaling:+--scaling "$scaling"} "${args[@]}"
