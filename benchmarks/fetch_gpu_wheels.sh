#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh installs offline on the GPU machine (Python 3.12,
# x86_64 Linux; it already has torch, transformers, safetensors) into .whl/ (git-ignored; carry it).
#
#   bash benchmarks/fetch_gpu_wheels.sh          # core set (~10 MB): torchtune and its own stack
#   bash benchmarks/fetch_gpu_wheels.sh --full   # + datasets 3.6 and its dependencies (pyarrow is ~40 MB)
#
# Without --full, modules torchtune imports but the check never uses (datasets, tokenizer
# libraries) are replaced by inert stand-ins at run time when they are missing (see perf.py).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl

core=(
  torchtune==0.6.1
  torchao==0.14.1
  torchdata==0.11.0
  omegaconf==2.3.0
  psutil==7.0.0
)
full=(
  datasets==3.6.0
  dill==0.3.8
  multiprocess==0.70.16
  xxhash==3.5.0
  fsspec==2025.3.0
  pyarrow==20.0.0
  pandas==2.2.3
  pytz==2025.2
  tzdata==2025.2
  python-dateutil==2.9.0.post0
  aiohttp==3.12.13
  aiohappyeyeballs==2.6.1
  aiosignal==1.3.2
  attrs==25.3.0
  frozenlist==1.7.0
  multidict==6.5.0
  propcache==0.3.2
  yarl==1.20.1
  sentencepiece==0.2.0
  tiktoken==0.9.0
  blobfile==3.0.0
  pillow==11.2.1
)
pkgs=("${core[@]}")
[ "${1:-}" = --full ] && pkgs+=("${full[@]}")

platform_args=(
  --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
)
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps "${platform_args[@]}" -d .whl "$p"
done
# omegaconf's parser runtime is published as an sdist only: build its (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
