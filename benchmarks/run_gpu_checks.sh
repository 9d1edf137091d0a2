#!/usr/bin/env bash
# The GPU checks of this project in one go, for a GPU node where the package is importable
# (`pip install -e '.[test]'`, or PYTHONPATH with the dependencies): tests/gpu, then the loss,
# fused output layer and step benchmarks on CUDA. Logs go to OUTDIR; copy the numbers into
# docs/benchmarks.md with the GPU model and the date.
#
#   benchmarks/run_gpu_checks.sh [OUTDIR]          (default: runs/gpu_checks)
#   PYTHON=python3 QUICK=1 benchmarks/run_gpu_checks.sh /tmp/out   # smaller benchmark sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%F;
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)";
  $PY -c "import transformer_engine as te; print('transformer_engine', te.__version__)" 2>&1 | tail -1; } \
  | tee "$OUT/machine.txt"
$PY -m pytest -ra -s tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" || status=1
if [ "${QUICK:-0}" = 1 ]; then sizes=4096x32768; else sizes=4096x32768,16384x38016,16384x152064; fi
$PY benchmarks/bench_logprobs.py --device cuda --tp 1 --sizes "$sizes" --json "$OUT/bench_logprobs.json" \
  2>&1 | tee "$OUT/bench_logprobs.log" || status=1
$PY benchmarks/bench_fused_logprobs.py --device cuda --tp 1 --repeats 3 --json "$OUT/bench_fused_logprobs.json" \
  $([ "${QUICK:-0}" = 1 ] && echo --sizes 4096x32768) 2>&1 | tee "$OUT/bench_fused_logprobs.log" || status=1
if [ "${QUICK:-0}" = 1 ]; then step="--hidden 1024 --layers 4 --seq 2048 --rounds 3"; else
  step="--hidden 2048 --layers 8 --seq 4096 --rounds 6"; fi
$PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_step.py $step --precision bf16 \
  --global-batch 8 --synthetic 4000 2>&1 | tee "$OUT/bench_step.log" || status=1
exit $status
