#!/usr/bin/env bash
# Multi-node launch with torchrun (run the same command on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/multinode_torchrun.sh configs qwen2_5_7b_instruct_psft
# NCCL is picked automatically on GPUs; extra arguments are config overrides.
set -euo pipefail
CONFIG_PATH=${1:-configs}
CONFIG_NAME=${2:-qwen2_5_7b_instruct_psft}
shift $(( $# > 2 ? 2 : $# ))
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first node}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: ordered TP/SP communication kernels
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pretrain_psft.py --config-path "$CONFIG_PATH" --config-name "$CONFIG_NAME" \
  trainer.devices="$GPUS_PER_NODE" trainer.num_nodes="$NNODES" "$@"
