#!/usr/bin/env bash
# The one-shot GPU check, offline, under 10 minutes on one H200 (benchmarks/gpu_check.py's sections).
#
#   bash benchmarks/fetch_gpu_wheels.sh     # once, here, with network: wheels + assets into .whl/
#   bash benchmarks/gpu_check.sh            # there: carry .whl; results in $OUT/gpu_check.json too
#   bash benchmarks/gpu_check.sh --dry-run  # here, on the CPU (or CPU_DRY_RUN=1): tiny shapes, no FP8
#
# Sections, each in its own process with its own timeout, all of them sharing GPU_CHECK_BUDGET
# seconds (545 unless set: a device call runs at most 600 s) less the install's time; a section
# with under 20 s left is skipped. Each is merged into the results file with its status as it
# ends (a timed-out one keeps what it finished); the whole log goes to $OUT/gpu_check.log too when
# $OUT is set (the device tool's return folder). Timeouts below; the H200 took 92 s (recipe), 80 / 103 / >120 s:
#   recipe      tune run adapt_prune_recipe --config smollm2/135M_adapt device=cuda dtype=bf16
#               compile=True, two stages, SmolLM2's shape at random init; loss recovers after
#               each resize; adapt-prune-tune export loads in transformers with finite logits (200 s)
#   recipe_fp8  the same run with enable_fp8_training=True and torchao's AdamWFp8; skipped below
#               compute capability 8.9 (200 s)
#   recipe_distill  the same run with distill.enabled=True (the random-init base as teacher) and
#               torchao's AdamW8bit, neither run on a GPU yet (200 s)
#   prune_loop  50 adaptive iterations on the Llama-3.1-8B shape, random bf16 weights (≤ 60 s);
#               recovery tokens/s ours ÷ stock on the pruned widths (≥ 0.97); peak memory (150 s)
#   compile     first-step compile after a resize vs the uniform model, Llama-3.2-1B shape; the default
#               compile_widths twice, the figure their median (200 s)
#   fp8         tokens/s with and without torchao float8 training on pruned widths (round_to=64);
#               skipped below compute capability 8.9 (180 s, or what the budget has left)
# Extra arguments go to gpu_check.py (e.g. --only compile,fp8 to finish in a second call).
set -uo pipefail
cd "$(dirname "$0")/.."

args=()
dry=${CPU_DRY_RUN:-0}
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    *) args+=("$a") ;;
  esac
done
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$dry" = 1 ]; then
  # Here: the installed packages (pip install -e .), the assets prepared into .whl/assets.
  [ -d .whl/assets ] || python3 benchmarks/gpu_assets.py .whl/assets || exit 1
  exec python3 benchmarks/gpu_check.py --dry-run "${args[@]}"
fi

t0=$(date +%s)
site="${SITE:-/tmp/site}"
if ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check: no wheels in .whl/ (run benchmarks/fetch_gpu_wheels.sh here and carry .whl)" >&2
  exit 1
fi
# The GPU machine has torch, transformers, safetensors, tokenizers, pandas, pyarrow; the rest
# (torchtune, torchao, datasets, omegaconf, ... and this project, built from the working tree)
# comes as wheels. Only the site dir on PYTHONPATH: the repo root would shadow the installed
# package, whose packaged configs live outside adapt_prune_tune/ in the source tree.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
  || exit 1
export PYTHONPATH="$site" PATH="$site/bin:$PATH" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, torchtune, torchao, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'| torchtune', torchtune.__version__, '| torchao', torchao.__version__, '| transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
installed=$(( $(date +%s) - t0 ))
budget=$(( ${GPU_CHECK_BUDGET:-545} - installed ))
echo "gpu_check: wheels installed in ${installed}s; ${budget}s for the sections"
log=/dev/null
[ -n "${OUT:-}" ] && [ -d "$OUT" ] && log="$OUT/gpu_check.log"
timeout $(( budget + 15 )) python3 benchmarks/gpu_check.py --budget "$budget" "${args[@]}" 2>&1 | tee "$log"
