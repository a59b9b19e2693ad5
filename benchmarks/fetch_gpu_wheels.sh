#!/usr/bin/env bash
# Everything benchmarks/gpu_check.sh needs that the GPU machine lacks and cannot fetch (no network
# there), into .whl/ (git-ignored; carry it): wheels for Python 3.12 on x86_64 Linux, this
# project's wheel built from the working tree, and the assets of its recipe run (gpu_assets.py:
# SmolLM2's config and tokenizer, corpus slices; needs `adapt-prune-tune prepare` done here).
#
#   bash benchmarks/fetch_gpu_wheels.sh     # ~14 MB; the carry limit is 64 MiB
#
# The GPU machine already has torch 2.11, transformers, safetensors, tokenizers, huggingface-hub,
# numpy, pandas, pyarrow, xxhash, aiohttp, requests, pyyaml, psutil, pillow, sentencepiece,
# tiktoken, protobuf, certifi (device README's package list); what torchtune's recipe, its data
# loading (datasets) and `tune` itself import beyond those is below, at the versions tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl  # one version of each package: two would stop the install there
mkdir -p .whl

wheels=(
  torchtune==0.6.1
  torchao==0.14.1      # >= 0.16 breaks torchtune 0.6.1's imports; abi3 wheel, any Python >= 3.10
  torchdata==0.11.0    # torchtune's StatefulDataLoader
  omegaconf==2.4.0
  datasets==3.6.0      # torchtune's text_completion_dataset (project pins < 4)
  dill==0.3.8          # datasets' pins
  multiprocess==0.70.16
  fsspec==2025.3.0
  kagglehub==1.0.3     # imported by `tune` (its download command) at start-up
  kagglesdk==0.1.38
)
platform_args=(
  --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)
python3 -m pip download -q --no-deps "${platform_args[@]}" -d .whl "${wheels[@]}"
python3 -m pip wheel -q --no-deps -w .whl .  # adapt-prune-tune, with its packaged configs
rm -rf build  # setuptools' scratch copy of the sources
python3 benchmarks/gpu_assets.py .whl/assets
ls -la .whl
du -sh .whl .whl/assets
