#!/usr/bin/env bash
# Download the wheels benchmarks/run_gpu_checks.sh needs on a GPU node without network (Python
# 3.12, x86_64, torch + CUDA already installed there) into .whl/ (~50 MB): megatron-core, the
# pure-Python dependencies of this package and pytest, pinned in benchmarks/gpu_wheels.txt.
# torch and the nvidia-* wheels are not included: the node has them.
#
#   benchmarks/build_gpu_wheelhouse.sh [DEST]        (default: .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
$PIP wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
$PIP download -q --dest "$DEST" --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -r benchmarks/gpu_wheels.txt
du -sh "$DEST"
