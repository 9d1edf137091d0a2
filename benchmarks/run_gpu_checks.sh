#!/usr/bin/env bash
# The GPU checks of this project in one go on a GPU node: tests/gpu (bf16, every layer spec the
# node can build, 1 GPU, an NCCL world of 1), then the loss, fused-output-layer, half-precision
# logits and step benchmarks on CUDA. Logs and a report go to OUTDIR; copy the numbers into
# docs/benchmarks.md with the GPU model and the date.
#
#   benchmarks/run_gpu_checks.sh [OUTDIR]          (default: runs/gpu_checks)
#   QUICK=1 benchmarks/run_gpu_checks.sh /tmp/out  # smaller benchmark sizes: ~8 minutes on one H100/H200
#
# Where the package's dependencies are missing and there is no network, carry the wheelhouse
# built by benchmarks/build_gpu_wheelhouse.sh (.whl/): they are installed from it into a venv
# that sees the node's torch (--system-site-packages), never touching torch itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_checks}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import megatron.core, omegaconf, transformers" 2>/dev/null && [ -d .whl ]; then
  $PY -m venv --system-site-packages .gpuenv && .gpuenv/bin/python -m pip install -q --no-index --no-deps .whl/*.whl \
    && PY=$PWD/.gpuenv/bin/python
fi
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; date -u +%F;
  $PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)";
  $PY -c "import transformer_engine as te; print('transformer_engine', te.__version__)" 2>&1 | tail -1; } \
  | tee "$OUT/machine.txt"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, and note the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/report.txt"
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || status=1
}
: > "$OUT/report.txt"
step tests_gpu 240 $PY -m pytest -ra -s tests/gpu
if [ "${QUICK:-0}" = 1 ]; then sizes=4096x32768; else sizes=4096x32768,16384x38016,16384x152064; fi
step bench_logprobs 90 $PY benchmarks/bench_logprobs.py --device cuda --tp 1 --sizes "$sizes" --json "$OUT/bench_logprobs.json"
step bench_fused_logprobs 120 $PY benchmarks/bench_fused_logprobs.py --device cuda --tp 1 --repeats 3 \
  --json "$OUT/bench_fused_logprobs.json" $([ "${QUICK:-0}" = 1 ] && echo --sizes 4096x32768)
step bench_half_logits 60 $PY benchmarks/bench_half_logits.py --vocab 152064 --seq 4096 --hidden 1024 \
  --json "$OUT/bench_half_logits.json"
if [ "${QUICK:-0}" = 1 ]; then steps="--hidden 1024 --layers 4 --seq 2048 --rounds 3"; else
  steps="--hidden 2048 --layers 8 --seq 4096 --rounds 6"; fi
step bench_step 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_step.py $steps \
  --precision bf16 --global-batch 8 --synthetic 4000
cat "$OUT/report.txt"
exit $status
