#!/usr/bin/env bash
# Checks that the `cuda` feature (candle's CUDA backend, `--device cuda`) compiles, on a machine
# without a GPU or a CUDA install: NVIDIA's compiler, headers and runtime come from PyPI into a
# venv, candle's kernels are compiled for one GPU architecture (CUDA_COMPUTE_CAP, default 90:
# H100/H200; nvidia-smi is not asked), and the trainer and the `atmorep` binary are linted with
# `--features cuda` in a target folder of their own (a check, not a build: linking needs libcuda,
# cuBLAS, cuRAND and NVRTC, which a GPU machine has).
#
#   scripts/check-cuda.sh            # target/cuda-check/ (venv and cargo artifacts)
#   CUDA_CHECK_DIR=/tmp/cc scripts/check-cuda.sh
#
# CUDA 13.0 is the toolkit: PyPI's CUDA 12 compiler packages ship ptxas but not nvcc, and cudarc
# 0.19 knows CUDA up to 13.4. About 25 minutes on 2 cores from nothing, half of it nvcc on
# candle's kernels (quantized matmul and MoE kernels the trainer never calls, built all the same);
# a second run only checks what changed. `cuda` does not combine with `nccl` yet (Cargo.toml's
# `cudarc` says why).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${CUDA_CHECK_DIR:-target/cuda-check}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
venv=$dir/cuda-venv
if ! compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; then
  if ! python3 -m venv "$venv"; then
    apt-get update -qq && apt-get install -y -qq python3-venv python3-pip
    rm -rf "$venv" && python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
cuda=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
export PATH="$cuda/bin:$PATH" CUDA_HOME="$cuda" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="$dir/target"
nvcc --version | tail -n 2
# One invocation, so candle's kernels (most of the time) are compiled once for both packages.
cargo clippy -p atmorep-trainer -p atmorep --all-targets --locked --features atmorep/cuda \
  -- -D warnings
echo "check-cuda: the cuda feature compiles (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
